//! The worker: `headroom worker --job N`, a child process that runs one job.
//!
//! It reads `Submit { plan }` from stdin, then any `Cancel`; it writes `Batch` records
//! and one `Finished` or `Failed` to its private copy of stdout. Running the job in its
//! own process means allocator settings in the environment apply before CUDA starts,
//! and a crash inside libtorch takes the job, not the agent.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shared::protocol::{ErrorCode, JobError, JobId, Message};

use crate::pipe;
use crate::train::{self, memory};

/// Moves the message channel off fd 1, so that anything a library prints to stdout
/// goes to stderr instead of corrupting frames.
fn private_stdout() -> std::io::Result<std::fs::File> {
    // SAFETY: dup/dup2 on the process's own standard descriptors; the new descriptor is
    // owned by the returned File alone.
    unsafe {
        let fd = libc::dup(1);
        if fd < 0 || libc::dup2(2, 1) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(std::fs::File::from_raw_fd(fd))
    }
}

pub fn run(job: JobId, files: train::JobFiles) -> anyhow::Result<()> {
    let out = std::io::BufWriter::new(private_stdout()?);
    let mut stdin = std::io::stdin().lock();
    let plan = match pipe::read_blocking(&mut stdin)? {
        Some(Message::Submit { plan, .. }) => plan,
        other => anyhow::bail!("worker expected a plan first, got {other:?}"),
    };
    drop(stdin);
    // Count every CPU tensor from here on, and enforce the plan's limit on the CPU.
    let cpu_budget = if train::runs_on_cpu(plan.device) { plan.memory_limit_bytes } else { None };
    memory::install_cpu_counter(cpu_budget);

    let stop = Arc::new(AtomicBool::new(false));
    let watcher_stop = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        // Cancel on request, and also when the agent goes away (end of stream).
        loop {
            match pipe::read_blocking(&mut stdin) {
                Ok(Some(Message::Cancel { .. })) | Ok(None) | Err(_) => break,
                Ok(Some(_)) => continue,
            }
        }
        watcher_stop.store(true, Ordering::Relaxed);
    });

    let write_failed = std::cell::Cell::new(false);
    let out = std::cell::RefCell::new(out);
    let send = |message: Message| {
        if !write_failed.get() && pipe::write_blocking(&mut *out.borrow_mut(), &message).is_err() {
            // The agent is gone: stop training at the next micro-batch.
            write_failed.set(true);
            stop.store(true, Ordering::Relaxed);
        }
    };
    let result = train::train(
        &plan,
        job,
        &files,
        &stop,
        |record| send(Message::Batch(record)),
        |step, event| send(Message::Event { job, step, event }),
    );
    let mut out = out.into_inner();
    let last = match result {
        Ok(summary) => Message::Finished { job, summary },
        Err(e) => Message::Failed { job, error: e.to_wire() },
    };
    pipe::write_blocking(&mut out, &last)?;
    out.flush()?;
    // Everything is said: leave with _exit, which skips atexit handlers and C++ static
    // destructors, so libtorch's teardown cannot hang while holding the job's slot.
    // SAFETY: the frames are flushed and nothing else in this process needs cleanup.
    unsafe { libc::_exit(0) }
}

/// `headroom worker --probe`: prints how many CUDA devices libtorch can use, so the
/// agent learns it without initialising CUDA in its own process.
pub fn probe() -> anyhow::Result<()> {
    println!("{}", train::cuda_device_count());
    Ok(())
}

/// A failure the agent reports when the worker died without saying why.
pub fn crashed(job: JobId, status: &str, stderr_tail: &str) -> Message {
    let detail = if stderr_tail.trim().is_empty() { String::new() } else { format!(": {}", stderr_tail.trim()) };
    Message::Failed {
        job,
        error: JobError { code: ErrorCode::WorkerCrashed, message: format!("worker process {status}{detail}") },
    }
}
