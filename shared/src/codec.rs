//! The one place that turns messages into bytes and back, so the format can be swapped
//! in this file alone.
//!
//! A frame is the protocol version as two little-endian bytes, the message's direction
//! as one byte (`protocol::Direction::tag`), then the message in bincode's standard
//! configuration. The version comes first and outside bincode so that a peer on another
//! version is told so instead of seeing garbage; the direction, so that a message sent
//! the wrong way (a client's request to a worker, an agent's reply to an agent) is
//! refused by name instead of being decoded as whatever the other enum has at that place.

use thiserror::Error;

use crate::protocol::{BatchRecord, Direction, ErrorCode, JobError, JobEvent, PROTOCOL_VERSION, Record, Summary, Wire};

/// Largest frame accepted or produced: 1 MiB. A plan or a batch record is well under a
/// kilobyte; anything near this is a mistake or an attack.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

const VERSION_BYTES: usize = 2;

/// The last version whose frames had no direction byte: one message enum went every way.
/// A run's log written by it is still read (see [`decode_stored`]).
pub const UNDIRECTED_VERSION: u16 = 16;

/// The versions since [`UNDIRECTED_VERSION`] whose run records are today's: what changed
/// after them (the plan's `cpu_isa`, version 18; an exported model and three losses in
/// the plan, version 19) is not in a record, so a run log
/// written by them reads as if written now.
pub const SAME_RECORDS_SINCE: u16 = 17;

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
    #[error("this side takes {} messages, not {} ones", want.describe(), got.describe())]
    WrongDirection { got: Direction, want: Direction },
}

impl CodecError {
    /// The wire error code that reports this to the peer.
    pub fn code(&self) -> ErrorCode {
        match self {
            CodecError::TooLarge { .. } => ErrorCode::TooLarge,
            CodecError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            CodecError::Malformed { .. } => ErrorCode::Malformed,
            CodecError::WrongDirection { .. } => ErrorCode::Unexpected,
        }
    }
}

fn malformed(e: impl ToString) -> CodecError {
    CodecError::Malformed { reason: e.to_string() }
}

pub fn encode<M: Wire>(message: &M) -> Result<Vec<u8>, CodecError> {
    let mut frame = PROTOCOL_VERSION.to_le_bytes().to_vec();
    frame.push(M::DIRECTION.tag());
    // Encoding has no limit of its own in bincode: the size is checked below.
    let payload = bincode::serde::encode_to_vec(message, config()).map_err(malformed)?;
    frame.extend_from_slice(&payload);
    if frame.len() > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge { len: frame.len(), limit: MAX_FRAME_BYTES });
    }
    Ok(frame)
}

/// The version of a frame no longer than the limit, and what follows it.
fn versioned(frame: &[u8]) -> Result<(u16, &[u8]), CodecError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(CodecError::TooLarge { len: frame.len(), limit: MAX_FRAME_BYTES });
    }
    let Some((version, rest)) = frame.split_first_chunk::<VERSION_BYTES>() else {
        return Err(malformed(format!("{} bytes is shorter than a header", frame.len())));
    };
    Ok((u16::from_le_bytes(*version), rest))
}

/// All of `payload` as one `T`.
fn whole<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, CodecError> {
    let (value, read) = bincode::serde::decode_from_slice::<T, _>(payload, config()).map_err(malformed)?;
    if read != payload.len() {
        return Err(malformed(format!("{} trailing bytes", payload.len() - read)));
    }
    Ok(value)
}

pub fn decode<M: Wire>(frame: &[u8]) -> Result<M, CodecError> {
    let (got, rest) = versioned(frame)?;
    if got != PROTOCOL_VERSION {
        return Err(CodecError::UnsupportedVersion { got, want: PROTOCOL_VERSION });
    }
    let Some((&tag, payload)) = rest.split_first() else {
        return Err(malformed(format!("{} bytes is shorter than a header", frame.len())));
    };
    match Direction::from_tag(tag) {
        Some(d) if d == M::DIRECTION => whole(payload),
        Some(d) => Err(CodecError::WrongDirection { got: d, want: M::DIRECTION }),
        None => Err(malformed(format!("no direction has tag {tag}"))),
    }
}

/// A run's stored record: a frame of this version, or one that version
/// [`UNDIRECTED_VERSION`] wrote, which held the stream messages of the one enum that
/// went every way (`Batch` 3, `Finished` 4, `Failed` 5 and `Event` 8 in its order,
/// each with the job's number, which the run's own record drops).
pub fn decode_stored(frame: &[u8]) -> Result<Record, CodecError> {
    let (got, rest) = versioned(frame)?;
    if (SAME_RECORDS_SINCE..PROTOCOL_VERSION).contains(&got) {
        let mut today = PROTOCOL_VERSION.to_le_bytes().to_vec();
        today.extend_from_slice(rest);
        return decode(&today);
    }
    if got != UNDIRECTED_VERSION {
        return decode(frame);
    }
    let Some((&variant, payload)) = rest.split_first() else {
        return Err(malformed("a version-16 record without its message"));
    };
    Ok(match variant {
        3 => Record::Batch(whole::<BatchRecord>(payload)?),
        4 => Record::Finished { summary: whole::<(u64, Summary)>(payload)?.1 },
        5 => Record::Failed { error: whole::<(u64, JobError)>(payload)?.1 },
        8 => {
            let (_job, step, event) = whole::<(u64, u64, JobEvent)>(payload)?;
            Record::Event { step, event }
        }
        other => return Err(malformed(format!("message {other} of version 16 is not a run's record"))),
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::estimate::Phase;
    use crate::plan::Plan;
    use crate::protocol::*;

    fn record(job: JobId, step: u64, loss: f64, reserved: Option<u64>) -> Record {
        Record::Batch(BatchRecord {
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

    const ACCEPTED_LEN: usize = 139;

    #[test]
    fn fixed_bytes_notice_format_changes() {
        // If this fails, the wire format changed: bump PROTOCOL_VERSION and update it.
        let bytes = encode(&ToAgent::Cancel { job: 5 }).expect("encode");
        assert_eq!(bytes, vec![19, 0, 1, 1, 5]);
        let bytes = encode(&ToClient::Error { code: ErrorCode::Busy, message: "busy".into() }).expect("encode");
        assert_eq!(bytes, vec![19, 0, 2, 6, 5, 4, b'b', b'u', b's', b'y']);
        assert_eq!(encode(&ToWorker::Cancel).expect("encode"), vec![19, 0, 3, 1]);
        // Accepted carries the whole Estimate: a field added to it or to Plan changes this
        // length. The value is this encoding's own; change it together with the version.
        let estimate = crate::estimate(&Plan::example_cnn()).expect("estimate");
        let accepted = encode(&ToClient::Accepted { job: 1, estimate, device: "cpu".into() }).expect("encode");
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
        let replies = vec![
            ToClient::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                agent_version: "0.1.0".into(),
                devices: vec![DeviceInfo { id: "cpu".into(), name: "x86_64".into(), total_memory_bytes: 1 << 34 }],
                capabilities: Capabilities {
                    cuda: false,
                    nvml: false,
                    cpu_isa: Some(crate::isa::CpuIsa::Avx2),
                    max_concurrent_jobs: 1,
                },
            }),
            ToClient::Accepted { job: 1, estimate, device: "cpu".into() },
            ToClient::Logged {
                job: 2,
                seq: 7,
                record: Record::Failed {
                    error: JobError { code: ErrorCode::Interrupted, message: "agent stopped".into() },
                },
            },
            ToClient::AgentStatus(crate::protocol::AgentStatus {
                devices: vec![crate::protocol::DeviceStatus {
                    id: "cuda:0".into(),
                    total_memory_bytes: 16 << 30,
                    free_memory_bytes: Some(1 << 30),
                    running: vec![2],
                }],
                queued: vec![3, 4],
                max_queued: 64,
            }),
            ToClient::Run {
                info: info.clone(),
                plan: Box::new(Plan::example_mlp()),
                estimate: Some(Box::new(crate::estimate(&Plan::example_mlp()).expect("estimate"))),
            },
            ToClient::Runs { runs: vec![info], more: true },
            ToClient::Error { code: ErrorCode::Busy, message: "busy".into() },
        ];
        for m in replies {
            assert_eq!(decode::<ToClient>(&encode(&m).expect("encode")).expect("decode"), m);
        }
        let requests = vec![
            ToAgent::Submit { plan: plan.clone(), force: false, key: Some(0x0123_4567_89ab_cdef) },
            ToAgent::Cancel { job: 2 },
            ToAgent::Attach { job: 2, after: 6 },
            ToAgent::ListRuns { before: Some(9), limit: 20 },
            ToAgent::GetRun { job: 2 },
            ToAgent::Status,
        ];
        for m in requests {
            assert_eq!(decode::<ToAgent>(&encode(&m).expect("encode")).expect("decode"), m);
        }
        for m in [ToWorker::Start { plan }, ToWorker::Cancel] {
            assert_eq!(decode::<ToWorker>(&encode(&m).expect("encode")).expect("decode"), m);
        }
        let records = vec![
            record(1, 3, 2.25, Some(5)),
            Record::Event { step: 2, event: JobEvent::LossScaleSkip { scale: 1024.0 } },
            Record::Finished {
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
            Record::Failed { error: JobError { code: ErrorCode::OutOfMemory, message: "oom".into() } },
        ];
        for m in records {
            assert_eq!(decode::<Record>(&encode(&m).expect("encode")).expect("decode"), m);
        }
    }

    #[test]
    fn every_frame_under_the_limit_decodes_and_one_over_is_too_large() {
        // A plan with one huge unknown model key, its frame a few bytes under the limit.
        let submit = |len: usize| {
            let mut plan = Plan::example_cnn();
            plan.model.settings.insert("k".repeat(len), "1".into());
            ToAgent::Submit { plan, force: false, key: Some(7) }
        };
        let base = encode(&submit(0)).expect("small").len();
        // The key's length prefix grows from 1 to 5 bytes past 250.
        let under = submit(MAX_FRAME_BYTES - base - 8);
        let frame = encode(&under).expect("under the limit");
        assert!(frame.len() > MAX_FRAME_BYTES - 16 && frame.len() <= MAX_FRAME_BYTES, "{}", frame.len());
        assert_eq!(decode::<ToAgent>(&frame).expect("decodes"), under);
        let over = submit(MAX_FRAME_BYTES);
        assert!(matches!(encode(&over), Err(CodecError::TooLarge { .. })));
    }

    #[test]
    fn rejects_other_versions_garbage_and_oversized_frames() {
        let mut frame = encode(&ToAgent::Cancel { job: 1 }).expect("encode");
        let other = PROTOCOL_VERSION + 1;
        frame[..2].copy_from_slice(&other.to_le_bytes());
        assert_eq!(
            decode::<ToAgent>(&frame),
            Err(CodecError::UnsupportedVersion { got: other, want: PROTOCOL_VERSION })
        );
        assert!(matches!(decode::<ToAgent>(&[1]), Err(CodecError::Malformed { .. })));
        let v = PROTOCOL_VERSION.to_le_bytes();
        assert!(matches!(decode::<ToAgent>(&[v[0], v[1]]), Err(CodecError::Malformed { .. })));
        assert!(matches!(decode::<ToAgent>(&[v[0], v[1], 1, 200, 200, 200]), Err(CodecError::Malformed { .. })));
        assert!(matches!(decode::<ToAgent>(&[v[0], v[1], 9, 1, 5]), Err(CodecError::Malformed { .. })));
        let mut trailing = encode(&ToAgent::Cancel { job: 1 }).expect("encode");
        trailing.push(0);
        assert!(matches!(decode::<ToAgent>(&trailing), Err(CodecError::Malformed { .. })));
        let big = vec![0u8; MAX_FRAME_BYTES + 1];
        assert_eq!(
            decode::<ToAgent>(&big),
            Err(CodecError::TooLarge { len: MAX_FRAME_BYTES + 1, limit: MAX_FRAME_BYTES })
        );
        // A length prefix that claims more than the limit is refused before allocating.
        let mut lying = PROTOCOL_VERSION.to_le_bytes().to_vec();
        lying.extend_from_slice(&[Direction::ToClient.tag(), 6, 0]);
        lying.extend_from_slice(&[253, 255, 255, 255, 255, 255, 255, 255, 127]);
        assert!(matches!(decode::<ToClient>(&lying), Err(CodecError::Malformed { .. })));
        let huge = ToClient::Error { code: ErrorCode::Internal, message: "x".repeat(MAX_FRAME_BYTES) };
        assert!(matches!(encode(&huge), Err(CodecError::TooLarge { .. })));
    }

    #[test]
    fn a_message_sent_the_wrong_way_is_refused_by_name() {
        // `Cancel` is variant 1 of both ToAgent and ToWorker, with other fields: without
        // the direction byte one would be read as the other.
        let to_worker = encode(&ToWorker::Cancel).expect("encode");
        let err = decode::<ToAgent>(&to_worker).expect_err("wrong way");
        assert_eq!(err, CodecError::WrongDirection { got: Direction::ToWorker, want: Direction::ToAgent });
        assert_eq!(err.code(), ErrorCode::Unexpected);
        assert_eq!(err.to_string(), "this side takes client-to-agent messages, not agent-to-worker ones");
        let reply = encode(&ToClient::Runs { runs: Vec::new(), more: false }).expect("encode");
        assert!(matches!(decode::<ToAgent>(&reply), Err(CodecError::WrongDirection { got: Direction::ToClient, .. })));
        let record = encode(&Record::Failed { error: JobError { code: ErrorCode::Cancelled, message: String::new() } })
            .expect("encode");
        assert!(matches!(decode::<ToClient>(&record), Err(CodecError::WrongDirection { .. })));
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
    }

    #[test]
    fn records_stored_by_version_16_are_read() {
        // Written by version 16's `encode` (one `Message` enum for every direction), as a
        // run's log holds them: a batch, an event, the end and a failure, each of job 3.
        let batch = hex(
            "100003030201010000000000000440fbe803fbd00701fb001000fb611e00000000000029400000000000005440fca9f1d24d62503f",
        );
        let Record::Batch(b) = decode_stored(&batch).expect("batch") else { panic!("a batch") };
        assert_eq!(
            (b.job, b.step, b.loss, b.peak_bytes, b.reserved_bytes, b.host_rss_bytes),
            (3, 2, 2.5, 2000, Some(4096), 7777)
        );
        assert_eq!(b.learning_rate, 0.001);
        let event = hex("100008030203fb000209");
        assert_eq!(
            decode_stored(&event).expect("event"),
            Record::Event { step: 2, event: JobEvent::CacheEmptied { released_bytes: 512, micro_seconds: 9 } }
        );
        let finished =
            hex("10000403020200000000000004400000000000000040fbd007fb340800fb611e0000000000003e40000100fbdc05");
        let Record::Finished { summary } = decode_stored(&finished).expect("finished") else { panic!("the end") };
        assert_eq!((summary.steps, summary.peak_bytes, summary.estimated_peak_bytes), (2, 2000, 2100));
        assert_eq!(summary.phase_peaks, vec![(crate::estimate::Phase::Forward, 1500)]);
        let failed = hex("10000503080773746f70706564");
        assert_eq!(
            decode_stored(&failed).expect("failed"),
            Record::Failed { error: JobError { code: ErrorCode::Cancelled, message: "stopped".into() } }
        );
        // Today's frames read the same way; a version-16 frame that is no record does not.
        let now = record(3, 2, 2.5, None);
        assert_eq!(decode_stored(&encode(&now).expect("encode")).expect("today's"), now);
        assert!(matches!(decode_stored(&hex("10000601")), Err(CodecError::Malformed { .. })));
        assert!(matches!(decode_stored(&hex("0f000601")), Err(CodecError::UnsupportedVersion { got: 15, .. })));
    }

    #[test]
    fn records_stored_by_version_17_are_read_as_todays() {
        // Version 17's failure record (its records are today's; only the plan changed).
        let failed = hex("11000403080773746f70706564");
        assert_eq!(
            decode_stored(&failed).expect("version 17"),
            Record::Failed { error: JobError { code: ErrorCode::Cancelled, message: "stopped".into() } }
        );
        // Not on the wire: a live peer on version 17 is refused.
        assert!(matches!(decode::<Record>(&failed), Err(CodecError::UnsupportedVersion { got: 17, .. })));
        let mut today =
            encode(&Record::Failed { error: JobError { code: ErrorCode::Cancelled, message: "stopped".into() } })
                .expect("encode");
        today[..2].copy_from_slice(&17u16.to_le_bytes());
        assert_eq!(today, failed, "the fixed bytes are today's record under version 17");
    }

    proptest! {
        #[test]
        fn batch_records_round_trip(job in any::<u64>(), step in any::<u64>(), loss in any::<f64>().prop_filter("nan", |l| !l.is_nan()), reserved in proptest::option::of(any::<u64>())) {
            let m = record(job, step, loss, reserved);
            prop_assert_eq!(decode::<Record>(&encode(&m).expect("encode")).expect("decode"), m);
        }

        /// Past a valid version and direction, any bytes are a message or a `Malformed`
        /// error, never a panic, and a message that decodes is one the encoder writes back
        /// to itself.
        #[test]
        fn bytes_after_the_header_decode_to_a_message_or_a_clear_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut frame = PROTOCOL_VERSION.to_le_bytes().to_vec();
            frame.push(Direction::ToClient.tag());
            frame.extend_from_slice(&bytes);
            match decode::<ToClient>(&frame) {
                // Compared as bytes: a decoded record may hold a NaN.
                Ok(m) => {
                    let again = encode(&m).expect("encode");
                    prop_assert_eq!(encode(&decode::<ToClient>(&again).expect("decode")).expect("encode"), again);
                }
                Err(e) => prop_assert!(matches!(e, CodecError::Malformed { .. }), "{e:?}"),
            }
        }
    }
}
