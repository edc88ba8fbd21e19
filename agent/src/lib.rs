//! The Headroom agent: a WebSocket server that runs training jobs in worker processes
//! and streams their per-batch loss and memory, plus the CLI built on the same parts.
//!
//! Architecture invariant: the agent names no tch (its crate does not depend on it;
//! the trainer crate runs jobs, reached only through `trainer::worker`); every byte
//! that crosses a socket or a pipe goes through `shared::codec`. Only `cli` is public,
//! so rustc sees every item nothing uses.

mod accuracy;
mod auth;
mod calibration;
pub mod cli;
mod connection;
mod devices;
mod finder;
mod http;
mod input;
mod jobs;
mod local;
mod probe;
mod report;
mod runlog;
mod runs;
mod serve;
mod server;
mod session;
mod stream;
mod tokens;
mod tools;
