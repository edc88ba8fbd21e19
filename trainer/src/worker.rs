//! The worker: `headroom worker --job N`, a child process that runs one job.
//!
//! It reads `ToWorker::Start { plan }` from stdin, then any `Cancel`; it writes `Batch`
//! and `Event` records and one `Finished` or `Failed` to its private copy of stdout. Running the job in its
//! own process means allocator settings in the environment apply before CUDA starts,
//! and a crash inside libtorch takes the job, not the agent.

use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use shared::protocol::{BatchRecord, JobEvent, JobId, Record, ToWorker};

use system::job::JobFiles;
use system::pipe;

use crate::memory;
use crate::training::{self, Report, Trainer};

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

/// The job's records and events, framed onto the worker's private stdout.
struct PipeReport<'a, W: Write> {
    out: W,
    /// The agent is gone: nothing more is written.
    failed: bool,
    stop: &'a AtomicBool,
}

impl<W: Write> PipeReport<'_, W> {
    fn send(&mut self, message: &Record) {
        if !self.failed && pipe::write_blocking(&mut self.out, message).is_err() {
            // The agent is gone: stop training at the next micro-batch.
            self.failed = true;
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

impl<W: Write> Report for PipeReport<'_, W> {
    fn record(&mut self, record: BatchRecord) {
        self.send(&Record::Batch(record));
    }

    fn event(&mut self, step: u64, event: JobEvent) {
        self.send(&Record::Event { step, event });
    }
}

pub fn run(job: JobId, files: JobFiles) -> anyhow::Result<()> {
    let out = std::io::BufWriter::new(private_stdout()?);
    let mut stdin = std::io::stdin().lock();
    let plan = match pipe::read_blocking::<ToWorker>(&mut stdin)? {
        Some(ToWorker::Start { plan }) => plan,
        other => anyhow::bail!("worker expected a plan first, got {other:?}"),
    };
    drop(stdin);
    // Count every CPU tensor from here on, and enforce the plan's limit on the CPU.
    let on_cpu = matches!(training::runs_on(plan.device), Ok(shared::machine::RunsOn::Cpu));
    let cpu_budget = if on_cpu { plan.memory_limit_bytes } else { None };
    memory::install_cpu_counter(cpu_budget);

    let stop = Arc::new(AtomicBool::new(false));
    let watcher_stop = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        // Cancel on request, and also when the agent goes away (end of stream).
        loop {
            match pipe::read_blocking::<ToWorker>(&mut stdin) {
                Ok(Some(ToWorker::Cancel)) | Ok(None) | Err(_) => break,
                Ok(Some(ToWorker::Start { .. })) => continue,
            }
        }
        watcher_stop.store(true, Ordering::Relaxed);
    });

    let mut pipe_out = PipeReport { out, failed: false, stop: &stop };
    let result = Trainer::new(&plan, job, &files, &stop, &mut pipe_out).and_then(Trainer::run);
    let mut out = pipe_out.out;
    let last = match result {
        Ok(summary) => Record::Finished { summary },
        Err(e) => Record::Failed { error: e.to_wire() },
    };
    pipe::write_blocking(&mut out, &last)?;
    out.flush()?;
    // Everything is said: leave with _exit, which skips atexit handlers and C++ static
    // destructors, so libtorch's teardown cannot hang while holding the job's slot.
    // SAFETY: the frames are flushed and nothing else in this process needs cleanup.
    unsafe { libc::_exit(0) }
}

/// `headroom worker --probe`: prints what libtorch can use here (CUDA devices, CPU
/// threads) as one JSON line, so the agent learns it without initialising CUDA or
/// loading libtorch's threads in its own process.
pub fn probe() -> anyhow::Result<()> {
    println!("{}", system::job::probe_line(&training::machine()));
    Ok(())
}
