//! A WebSocket carrying protocol messages: callers see typed messages, never frames.

use crate::stream::BoxIo;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use shared::codec::{self, CodecError};
use shared::protocol::{ToAgent, ToClient};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, protocol::CloseFrame, protocol::frame::coding::CloseCode};

type Ws = WebSocketStream<BoxIo>;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("text frames are not part of the protocol; send binary frames")]
    Text,
    #[error("websocket: {0}")]
    Transport(#[from] tungstenite::Error),
}

impl ReadError {
    /// The close code that best tells the peer why the connection ends.
    pub fn close_code(&self) -> CloseCode {
        match self {
            ReadError::Codec(CodecError::TooLarge { .. }) => CloseCode::Size,
            ReadError::Codec(CodecError::UnsupportedVersion { .. }) => CloseCode::Protocol,
            ReadError::Codec(CodecError::Malformed { .. }) => CloseCode::Invalid,
            // The session answers a message sent the wrong way and goes on; a peer that
            // closes over one would say so.
            ReadError::Codec(CodecError::WrongDirection { .. }) => CloseCode::Protocol,
            ReadError::Text => CloseCode::Unsupported,
            ReadError::Transport(tungstenite::Error::Capacity(_)) => CloseCode::Size,
            ReadError::Transport(_) => CloseCode::Protocol,
        }
    }
}

pub struct Connection {
    sink: SplitSink<Ws, tungstenite::Message>,
    stream: SplitStream<Ws>,
    /// When the peer last sent a frame of any kind (pongs included).
    heard: tokio::time::Instant,
    /// The largest message the peer may send (`--max-message-bytes`).
    max_message_bytes: usize,
}

impl Connection {
    pub fn new(ws: Ws, max_message_bytes: usize) -> Connection {
        let (sink, stream) = ws.split();
        Connection { sink, stream, heard: tokio::time::Instant::now(), max_message_bytes }
    }

    /// When the peer last sent a frame.
    pub fn heard(&self) -> tokio::time::Instant {
        self.heard
    }

    /// A ping; browsers and tungstenite answer with a pong, which counts as heard.
    pub async fn ping(&mut self) -> Result<(), tungstenite::Error> {
        self.sink.send(tungstenite::Message::Ping(Vec::new().into())).await
    }

    /// The next message; `Ok(None)` when the peer closed cleanly. Cancel-safe.
    pub async fn read(&mut self) -> Result<Option<ToAgent>, ReadError> {
        loop {
            let Some(frame) = self.stream.next().await else {
                return Ok(None);
            };
            self.heard = tokio::time::Instant::now();
            match frame? {
                tungstenite::Message::Binary(bytes) if bytes.len() > self.max_message_bytes => {
                    return Err(ReadError::Codec(CodecError::TooLarge {
                        len: bytes.len(),
                        limit: self.max_message_bytes,
                    }));
                }
                tungstenite::Message::Binary(bytes) => return Ok(Some(codec::decode(&bytes)?)),
                tungstenite::Message::Text(_) => return Err(ReadError::Text),
                tungstenite::Message::Close(_) => return Ok(None),
                // Pings are answered by tungstenite; pongs and raw frames carry nothing.
                _ => continue,
            }
        }
    }

    pub async fn write(&mut self, message: &ToClient) -> Result<(), tungstenite::Error> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Queues a message; [`Connection::flush`] sends what is queued.
    pub async fn feed(&mut self, message: &ToClient) -> Result<(), tungstenite::Error> {
        let bytes = codec::encode(message).map_err(|e| tungstenite::Error::Io(std::io::Error::other(e)))?;
        self.sink.feed(tungstenite::Message::Binary(bytes.into())).await
    }

    /// Queues a frame already encoded with `shared::codec` (shared by every client it
    /// goes to); [`Connection::flush`] sends what is queued.
    pub async fn feed_frame(&mut self, frame: bytes::Bytes) -> Result<(), tungstenite::Error> {
        self.sink.feed(tungstenite::Message::Binary(frame)).await
    }

    pub async fn flush(&mut self) -> Result<(), tungstenite::Error> {
        self.sink.flush().await
    }

    pub async fn close(&mut self, code: CloseCode, reason: &str) {
        // A close reason must fit a control frame (123 bytes); cut at a char boundary.
        let mut end = reason.len().min(120);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let frame = CloseFrame { code, reason: reason[..end].to_owned().into() };
        let _ = self.sink.send(tungstenite::Message::Close(Some(frame))).await;
        let _ = self.sink.close().await;
    }
}
