//! The one place that turns messages into bytes and back, so the format can be swapped
//! in this file alone.
//!
//! A frame is the protocol version as two little-endian bytes, then the message in
//! bincode's standard configuration. The version comes first and outside bincode so
//! that a peer on another version is told so instead of seeing garbage.

use thiserror::Error;

use crate::protocol::{ErrorCode, Message, PROTOCOL_VERSION};

/// Largest frame accepted or produced: 1 MiB. A plan or a batch record is well under a
/// kilobyte; anything near this is a mistake or an attack.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

const VERSION_BYTES: usize = 2;

/// What one frame may make the decoder allocate: bincode counts a collection's
/// in-memory size (`len × size_of` of its items, more than their encoded bytes), so this
/// sits well above the frame limit, so that every frame under that limit decodes, while a
/// lying length prefix still cannot ask for more.
const MAX_DECODE_CLAIM: usize = 32 * MAX_FRAME_BYTES;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODE_CLAIM>()
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CodecError {
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge { len: usize, limit: usize },
    #[error("protocol version {got} is not supported (this side speaks version {want})")]
    UnsupportedVersion { got: u16, want: u16 },
    #[error("malformed message: {reason}")]
    Malformed { reason: String },
}

impl CodecError {
    /// The wire error code that reports this to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            CodecError::TooLarge { .. } => ErrorCode::TooLarge,
            CodecError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            CodecError::Malformed { .. } => ErrorCode::Malformed,
        }
    }
}

pub fn encode(message: &Message) -> Result<Vec<u8>, CodecError> {
    let mut frame = PROTOCOL_VERSION.to_le_bytes().to_vec();
    // Encoding has no limit of its own in bincode: the size is checked below.
    let payload = bincode::serde::encode_to_vec(message, config())
        .map_err(|e| CodecError::Malformed { reason: e.to_string() })?;
    frame.extend_from_slice(&payload);
    if frame.len() > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge { len: frame.len(), limit: MAX_FRAME_BYTES });
    }
    Ok(frame)
}

pub fn decode(frame: &[u8]) -> Result<Message, CodecError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge { len: frame.len(), limit: MAX_FRAME_BYTES });
    }
    let Some((version, payload)) = frame.split_first_chunk::<VERSION_BYTES>() else {
        return Err(CodecError::Malformed { reason: format!("{} bytes is shorter than a header", frame.len()) });
    };
    let got = u16::from_le_bytes(*version);
    if got != PROTOCOL_VERSION {
        return Err(CodecError::UnsupportedVersion { got, want: PROTOCOL_VERSION });
    }
    let (message, read) = bincode::serde::decode_from_slice::<Message, _>(payload, config())
        .map_err(|e| CodecError::Malformed { reason: e.to_string() })?;
    if read != payload.len() {
        return Err(CodecError::Malformed { reason: format!("{} trailing bytes", payload.len() - read) });
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::estimate::Phase;
    use crate::plan::Plan;
    use crate::protocol::*;

    fn record(job: JobId, step: u64, loss: f64, reserved: Option<u64>) -> Message {
        Message::Batch(BatchRecord {
            job,
            step,
            epoch: 1,
            micro_batch: 1,
            loss,
            allocated_bytes: 1 << 20,
            peak_bytes: 3 << 20,
            reserved_bytes: reserved,
            device_used_bytes: None,
            host_rss_bytes: 200 << 20,
            step_time_ms: 12.5,
            samples_per_sec: 2560.0,
            learning_rate: 1e-3,
        })
    }

    const ACCEPTED_LEN: usize = 138;

    #[test]
    fn fixed_bytes_notice_format_changes() {
        // If this fails, the wire format changed: bump PROTOCOL_VERSION and update it.
        let bytes = encode(&Message::Cancel { job: 5 }).expect("encode");
        assert_eq!(bytes, vec![16, 0, 6, 5]);
        let bytes = encode(&Message::Error { code: ErrorCode::Busy, message: "busy".into() }).expect("encode");
        assert_eq!(bytes, vec![16, 0, 7, 5, 4, b'b', b'u', b's', b'y']);
        // Accepted carries the whole Estimate: a field added to it or to Plan changes this
        // length. The value is this encoding's own; change it together with the version.
        let estimate = crate::estimate(&Plan::example_cnn()).expect("estimate");
        let accepted = encode(&Message::Accepted { job: 1, estimate, device: "cpu".into() }).expect("encode");
        assert_eq!(accepted.len(), ACCEPTED_LEN);
    }

    #[test]
    fn every_kind_of_message_round_trips() {
        let plan = Plan::example_cnn();
        let estimate = crate::estimate(&plan).expect("estimate");
        let info = crate::protocol::RunInfo {
            job: 2,
            name: "w4".into(),
            state: crate::protocol::RunState::Interrupted,
            device: "cuda:0".into(),
            created_unix_ms: 1,
            ended_unix_ms: Some(2),
            records: 7,
            steps: 40,
            estimated_peak_bytes: 3,
            measured_peak_bytes: None,
            error: Some(JobError { code: ErrorCode::Interrupted, message: "agent stopped".into() }),
        };
        let messages = vec![
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "0.1.0".into(),
                devices: vec![DeviceInfo { id: "cpu".into(), name: "x86_64".into(), total_memory_bytes: 1 << 34 }],
                capabilities: Capabilities { cuda: false, nvml: false, max_concurrent_jobs: 1 },
            }),
            Message::Submit { plan, force: false, key: Some(0x0123_4567_89ab_cdef) },
            Message::Accepted { job: 1, estimate, device: "cpu".into() },
            record(1, 3, 2.25, Some(5)),
            Message::Finished {
                job: 1,
                summary: Summary {
                    steps: 3,
                    micro_batches: 6,
                    first_loss: 2.3,
                    final_loss: 1.1,
                    peak_bytes: 10,
                    estimated_peak_bytes: 11,
                    peak_reserved_bytes: None,
                    peak_host_rss_bytes: 12,
                    wall_time_ms: 1.5,
                    dropped_records: 0,
                    phase_peaks: vec![(Phase::Backward, 9)],
                },
            },
            Message::Failed { job: 1, error: JobError { code: ErrorCode::OutOfMemory, message: "oom".into() } },
            Message::Logged {
                job: 2,
                seq: 7,
                record: crate::protocol::Record::Failed {
                    error: JobError { code: ErrorCode::Interrupted, message: "agent stopped".into() },
                },
            },
            Message::Attach { job: 2, after: 6 },
            Message::ListRuns { before: Some(9), limit: 20 },
            Message::GetRun { job: 2 },
            Message::Status,
            Message::AgentStatus(crate::protocol::AgentStatus {
                devices: vec![crate::protocol::DeviceStatus {
                    id: "cuda:0".into(),
                    total_memory_bytes: 16 << 30,
                    free_memory_bytes: Some(1 << 30),
                    running: vec![2],
                }],
                queued: vec![3, 4],
                max_queued: 64,
            }),
            Message::Run {
                info: info.clone(),
                plan: Box::new(Plan::example_mlp()),
                estimate: Some(Box::new(crate::estimate(&Plan::example_mlp()).expect("estimate"))),
            },
            Message::Runs { runs: vec![info], more: true },
        ];
        for m in messages {
            assert_eq!(decode(&encode(&m).expect("encode")).expect("decode"), m);
        }
    }

    #[test]
    fn every_frame_under_the_limit_decodes_and_one_over_is_too_large() {
        // A plan with one huge unknown model key, its frame a few bytes under the limit.
        let submit = |len: usize| {
            let mut plan = Plan::example_cnn();
            if let crate::plan::ModelSpec::Zoo { settings, .. } = &mut plan.model {
                settings.insert("k".repeat(len), "1".into());
            }
            Message::Submit { plan, force: false, key: Some(7) }
        };
        let base = encode(&submit(0)).expect("small").len();
        // The key's length prefix grows from 1 to 5 bytes past 250.
        let under = submit(MAX_FRAME_BYTES - base - 8);
        let frame = encode(&under).expect("under the limit");
        assert!(frame.len() > MAX_FRAME_BYTES - 16 && frame.len() <= MAX_FRAME_BYTES, "{}", frame.len());
        assert_eq!(decode(&frame).expect("decodes"), under);
        let over = submit(MAX_FRAME_BYTES);
        assert!(matches!(encode(&over), Err(CodecError::TooLarge { .. })));
    }

    #[test]
    fn rejects_other_versions_garbage_and_oversized_frames() {
        let mut frame = encode(&Message::Cancel { job: 1 }).expect("encode");
        let other = PROTOCOL_VERSION + 1;
        frame[..2].copy_from_slice(&other.to_le_bytes());
        assert_eq!(decode(&frame), Err(CodecError::UnsupportedVersion { got: other, want: PROTOCOL_VERSION }));
        assert!(matches!(decode(&[1]), Err(CodecError::Malformed { .. })));
        let v = PROTOCOL_VERSION.to_le_bytes();
        assert!(matches!(decode(&[v[0], v[1], 200, 200, 200]), Err(CodecError::Malformed { .. })));
        let mut trailing = encode(&Message::Cancel { job: 1 }).expect("encode");
        trailing.push(0);
        assert!(matches!(decode(&trailing), Err(CodecError::Malformed { .. })));
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert_eq!(decode(&big), Err(CodecError::TooLarge { len: MAX_FRAME_BYTES + 1, limit: MAX_FRAME_BYTES }));
        // A length prefix that claims more than the limit is refused before allocating.
        let mut lying = PROTOCOL_VERSION.to_le_bytes().to_vec();
        lying.extend_from_slice(&[7, 0]);
        lying.extend_from_slice(&[253, 255, 255, 255, 255, 255, 255, 255, 127]);
        assert!(matches!(decode(&lying), Err(CodecError::Malformed { .. })));
        let huge = Message::Error { code: ErrorCode::Internal, message: "x".repeat(MAX_FRAME_BYTES) };
        assert!(matches!(encode(&huge), Err(CodecError::TooLarge { .. })));
    }

    proptest! {
        #[test]
        fn batch_records_round_trip(job in any::<u64>(), step in any::<u64>(), loss in any::<f64>().prop_filter("nan", |l| !l.is_nan()), reserved in proptest::option::of(any::<u64>())) {
            let m = record(job, step, loss, reserved);
            prop_assert_eq!(decode(&encode(&m).expect("encode")).expect("decode"), m);
        }

        /// Past a valid version, any bytes are a message or a `Malformed` error, never a
        /// panic, and a message that decodes is one the encoder writes back to itself.
        #[test]
        fn bytes_after_the_version_decode_to_a_message_or_a_clear_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut frame = PROTOCOL_VERSION.to_le_bytes().to_vec();
            frame.extend_from_slice(&bytes);
            match decode(&frame) {
                // Compared as bytes: a decoded record may hold a NaN.
                Ok(m) => {
                    let again = encode(&m).expect("encode");
                    prop_assert_eq!(encode(&decode(&again).expect("decode")).expect("encode"), again);
                }
                Err(e) => prop_assert!(matches!(e, CodecError::Malformed { .. }), "{e:?}"),
            }
        }
    }
}
