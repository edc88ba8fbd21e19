//! The loader: worker threads making whole batches in order into host memory, at most
//! `workers × prefetch` ahead, lowered on demand by the host memory guard.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use super::*;

pub(super) struct Queue {
    /// The next batch a worker will start.
    next_to_make: u64,
    /// Batches made and not yet taken, by index.
    ready: BTreeMap<u64, Result<HostBatch, DataError>>,
    /// The next batch the trainer takes.
    taken: u64,
    /// Batches workers have started and not finished: memory the resident set does
    /// not show yet.
    pub(super) making: u64,
    stop: bool,
}

pub(super) struct Shared {
    dataset: Arc<Dataset>,
    batch: usize,
    seed: u64,
    /// Run position (in samples) of batch 0.
    start: u64,
    pub(super) queue: Mutex<Queue>,
    changed: Condvar,
    workers: AtomicUsize,
    prefetch: AtomicUsize,
    /// Whether there is host memory for one more batch; a worker waits while there is
    /// not (the batch the trainer needs next is then made on its own thread).
    room: Room,
}

/// Says whether host memory has room for one more batch, given how many batches other
/// workers are making (started, so promised, but not yet resident): without them,
/// workers that look at the same moment would each see the same room and together
/// overshoot it.
pub type Room = Box<dyn Fn(u64) -> bool + Send + Sync>;

/// How long a waiting worker or trainer sleeps before it looks again.
pub(super) const POLL: std::time::Duration = std::time::Duration::from_millis(20);

impl Shared {
    fn make(&self, k: u64, order: &mut Order) -> Result<HostBatch, DataError> {
        self.dataset.batch(self.start + k * self.batch as u64, self.batch, self.seed, order)
    }

    fn budget(&self) -> u64 {
        (self.workers.load(Ordering::Relaxed) * self.prefetch.load(Ordering::Relaxed)) as u64
    }
}

/// Batches of a data set, made ahead on worker threads.
pub struct Loader {
    /// The epoch order when the trainer's thread makes a batch itself.
    order: Order,
    pub(super) shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Loader {
    /// Starts `workers` threads (0: batches are made when taken) that keep up to
    /// `workers × prefetch` batches of `batch` samples ready, from run position `start`.
    pub fn new(
        dataset: Arc<Dataset>,
        batch: usize,
        seed: u64,
        start: u64,
        workers: usize,
        prefetch: usize,
        room: Room,
    ) -> Loader {
        let shared = Arc::new(Shared {
            dataset,
            batch,
            seed,
            start,
            queue: Mutex::new(Queue { next_to_make: 0, ready: BTreeMap::new(), taken: 0, making: 0, stop: false }),
            changed: Condvar::new(),
            workers: AtomicUsize::new(workers),
            prefetch: AtomicUsize::new(prefetch.max(1)),
            room,
        });
        let threads = (0..workers)
            .map(|id| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("loader-{id}"))
                    .spawn(move || worker(&s, id))
                    .expect("spawning a loader thread")
            })
            .collect();
        Loader { order: None, shared, threads }
    }

    /// The next batch, in order.
    pub fn take(&mut self) -> Result<HostBatch, DataError> {
        let s = &self.shared;
        let mut q = s.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let k = q.taken;
        let mut waited = false;
        loop {
            if let Some(b) = q.ready.remove(&k) {
                q.taken += 1;
                s.changed.notify_all();
                return b;
            }
            if k >= q.next_to_make && (s.workers.load(Ordering::Relaxed) == 0 || waited) {
                // Nobody has started it (no workers, or they wait for memory): make it here.
                q.next_to_make = k + 1;
                q.taken += 1;
                drop(q);
                return s.make(k, &mut self.order);
            }
            s.changed.notify_all();
            let (guard, timeout) = s.changed.wait_timeout(q, POLL).unwrap_or_else(std::sync::PoisonError::into_inner);
            q = guard;
            waited = timeout.timed_out();
        }
    }

    /// (workers, prefetch) in force.
    pub fn setting(&self) -> (usize, usize) {
        (self.shared.workers.load(Ordering::Relaxed), self.shared.prefetch.load(Ordering::Relaxed))
    }

    /// Lowers the loader's memory: halves `prefetch` down to 1, then `workers` down to
    /// 0. Returns the new setting, or `None` when there is nothing left to lower.
    pub fn reduce(&self) -> Option<(usize, usize)> {
        let s = &self.shared;
        let (w, p) = self.setting();
        if p > 1 {
            s.prefetch.store(p / 2, Ordering::Relaxed);
        } else if w > 0 {
            s.workers.store(w / 2, Ordering::Relaxed);
        } else {
            return None;
        }
        s.changed.notify_all();
        Some(self.setting())
    }
}

pub(super) fn worker(s: &Shared, id: usize) {
    let mut order: Order = None;
    let mut q = s.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        if q.stop {
            return;
        }
        let active = id < s.workers.load(Ordering::Relaxed);
        if active && q.next_to_make < q.taken + s.budget() && (s.room)(q.making) {
            let k = q.next_to_make;
            q.next_to_make += 1;
            q.making += 1;
            drop(q);
            let b = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s.make(k, &mut order)))
                .unwrap_or_else(|_| Err(DataError(format!("the loader failed while making batch {k}"))));
            q = s.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            q.making -= 1;
            q.ready.insert(k, b);
            s.changed.notify_all();
        } else {
            // Woken by a change, or after a while to look at memory again.
            q = s.changed.wait_timeout(q, POLL).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        {
            let mut q = self.shared.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            q.stop = true;
            q.ready.clear();
        }
        self.shared.changed.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
