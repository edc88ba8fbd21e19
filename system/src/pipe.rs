//! Framing for the agent <-> worker pipe: a little-endian u32 length, then a codec
//! frame. The same codec and limit as the WebSocket, so one format crosses every edge:
//! `ToWorker` down the worker's stdin, `Record` up its stdout.

use shared::codec::{self, CodecError, MAX_FRAME_BYTES};
use shared::protocol::Wire;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error("pipe i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The length prefix and the frame, ready to write.
fn framed<M: Wire>(message: &M) -> Result<Vec<u8>, PipeError> {
    let frame = codec::encode(message)?;
    // encode() never returns more than MAX_FRAME_BYTES, which fits a u32.
    let len =
        u32::try_from(frame.len()).map_err(|_| CodecError::TooLarge { len: frame.len(), limit: MAX_FRAME_BYTES })?;
    let mut bytes = Vec::with_capacity(4 + frame.len());
    bytes.extend_from_slice(&len.to_le_bytes());
    bytes.extend_from_slice(&frame);
    Ok(bytes)
}

/// Checks a length prefix before anything is allocated for it.
fn frame_len(prefix: [u8; 4]) -> Result<usize, PipeError> {
    let len = u32::from_le_bytes(prefix) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge { len, limit: MAX_FRAME_BYTES }.into());
    }
    Ok(len)
}

fn end_of_stream<T>(e: std::io::Error) -> Result<Option<T>, PipeError> {
    if e.kind() == std::io::ErrorKind::UnexpectedEof { Ok(None) } else { Err(e.into()) }
}

/// Blocking write, for the worker's training thread.
pub fn write_blocking<M: Wire>(out: &mut impl std::io::Write, message: &M) -> Result<(), PipeError> {
    out.write_all(&framed(message)?)?;
    out.flush()?;
    Ok(())
}

/// Blocking read; `Ok(None)` at a clean end of stream.
pub fn read_blocking<M: Wire>(input: &mut impl std::io::Read) -> Result<Option<M>, PipeError> {
    let mut prefix = [0u8; 4];
    if let Err(e) = input.read_exact(&mut prefix) {
        return end_of_stream(e);
    }
    let mut frame = vec![0u8; frame_len(prefix)?];
    input.read_exact(&mut frame)?;
    Ok(Some(codec::decode(&frame)?))
}

pub async fn write<M: Wire>(out: &mut (impl AsyncWrite + Unpin), message: &M) -> Result<(), PipeError> {
    out.write_all(&framed(message)?).await?;
    out.flush().await?;
    Ok(())
}

/// `Ok(None)` at a clean end of stream.
pub async fn read<M: Wire>(input: &mut (impl AsyncRead + Unpin)) -> Result<Option<M>, PipeError> {
    let mut prefix = [0u8; 4];
    if let Err(e) = input.read_exact(&mut prefix).await {
        return end_of_stream(e);
    }
    let mut frame = vec![0u8; frame_len(prefix)?];
    input.read_exact(&mut frame).await?;
    Ok(Some(codec::decode(&frame)?))
}

#[cfg(test)]
mod tests {
    use shared::protocol::{JobEvent, Record, ToWorker};

    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_prefixes_are_refused() {
        let mut buf = Vec::new();
        let step = |step| Record::Event { step, event: JobEvent::Resumed { path: "p".into() } };
        write_blocking(&mut buf, &step(3)).expect("write");
        write_blocking(&mut buf, &step(4)).expect("write");
        write_blocking(&mut buf, &ToWorker::Cancel).expect("write");
        let mut input = &buf[..];
        assert_eq!(read_blocking::<Record>(&mut input).expect("read"), Some(step(3)));
        assert_eq!(read_blocking::<Record>(&mut input).expect("read"), Some(step(4)));
        // A message going the other way is refused, not misread.
        assert!(matches!(
            read_blocking::<Record>(&mut input),
            Err(PipeError::Codec(CodecError::WrongDirection { .. }))
        ));
        assert_eq!(read_blocking::<Record>(&mut input).expect("end"), None);
        let huge = u32::try_from(MAX_FRAME_BYTES + 1).expect("fits").to_le_bytes();
        assert!(matches!(read_blocking::<Record>(&mut &huge[..]), Err(PipeError::Codec(CodecError::TooLarge { .. }))));
    }
}
