//! Framing for the agent <-> worker pipe: a little-endian u32 length, then a codec
//! frame. The same codec and limit as the WebSocket, so one format crosses every edge.

use shared::codec::{self, CodecError, MAX_FRAME_BYTES};
use shared::protocol::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    #[error("pipe i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// Blocking write, for the worker's training thread.
pub fn write_blocking(out: &mut impl std::io::Write, message: &Message) -> Result<(), PipeError> {
    let frame = codec::encode(message)?;
    let len = u32::try_from(frame.len()).map_err(|_| CodecError::TooLarge {
        len: frame.len(),
        limit: MAX_FRAME_BYTES,
    })?;
    out.write_all(&len.to_le_bytes())?;
    out.write_all(&frame)?;
    out.flush()?;
    Ok(())
}

/// Blocking read; `Ok(None)` at a clean end of stream.
pub fn read_blocking(input: &mut impl std::io::Read) -> Result<Option<Message>, PipeError> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge {
            len,
            limit: MAX_FRAME_BYTES,
        }
        .into());
    }
    let mut frame = vec![0u8; len];
    input.read_exact(&mut frame)?;
    Ok(Some(codec::decode(&frame)?))
}

pub async fn write(
    out: &mut (impl AsyncWrite + Unpin),
    message: &Message,
) -> Result<(), PipeError> {
    let frame = codec::encode(message)?;
    let len = u32::try_from(frame.len()).map_err(|_| CodecError::TooLarge {
        len: frame.len(),
        limit: MAX_FRAME_BYTES,
    })?;
    out.write_all(&len.to_le_bytes()).await?;
    out.write_all(&frame).await?;
    out.flush().await?;
    Ok(())
}

pub async fn read(input: &mut (impl AsyncRead + Unpin)) -> Result<Option<Message>, PipeError> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge {
            len,
            limit: MAX_FRAME_BYTES,
        }
        .into());
    }
    let mut frame = vec![0u8; len];
    input.read_exact(&mut frame).await?;
    Ok(Some(codec::decode(&frame)?))
}
