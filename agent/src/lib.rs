//! The Headroom agent: a WebSocket server that runs training jobs in worker processes
//! and streams their per-batch loss and memory, plus the CLI built on the same parts.
//!
//! Architecture invariant: only `train` names tch; every byte that crosses a socket or
//! a pipe goes through `shared::codec`.

pub mod accuracy;
pub mod auth;
pub mod calibration;
pub mod cli;
pub mod connection;
pub mod data;
pub mod devices;
pub mod distance;
pub mod finder;
pub mod http;
pub mod input;
pub mod jobs;
pub mod local;
pub mod pipe;
pub mod probe;
pub mod report;
pub mod runlog;
pub mod runs;
pub mod serve;
pub mod server;
pub mod session;
pub mod stream;
pub mod tokens;
pub mod tools;
pub mod train;
pub mod worker;
