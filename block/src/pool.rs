//! A disk's I/O threads: a few threads that take checked requests ([`Slot`]s) from a
//! queue, run them against the image (`preadv`/`pwritev` straight into guest RAM,
//! `fdatasync`, `fallocate`), and put them on the completion queue, waking the event
//! loop through an eventfd. They never touch the virtqueue: the event loop, the one
//! owner of the rings, writes every answer ([`crate::queue`]).
//!
//! Neither queue allocates once built: a request can only be on one of them while it
//! holds one of the activation's [`crate::queue::MAX_IN_FLIGHT`] slots.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::queue::{Slot, MAX_IN_FLIGHT};

/// I/O threads per disk: as many as the requests a Linux guest keeps in flight on a
/// busy disk in the benchmark (fio, depth 8).
pub const IO_THREADS: usize = 8;
/// Stack of an I/O thread: the I/O path needs a few KiB.
const STACK_BYTES: usize = 256 << 10;

/// What runs first on every I/O thread (the VMM installs its system call filter): an
/// error ends the thread and fails [`Pool::new`].
pub type ThreadStart = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// How a disk's I/O threads are set up.
#[derive(Clone)]
pub struct IoOptions {
    /// How many.
    pub threads: usize,
    /// Runs first on each.
    pub on_start: Option<ThreadStart>,
    /// Whether the event loop answers small reads the host has cached itself (see
    /// [`crate::queue::CACHED_READ_MAX`]; off by default); off, every request goes to
    /// the threads.
    pub cached_reads: bool,
}

impl Default for IoOptions {
    fn default() -> Self {
        Self {
            threads: IO_THREADS,
            on_start: None,
            cached_reads: false,
        }
    }
}

impl std::fmt::Debug for IoOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoOptions")
            .field("threads", &self.threads)
            .field("on_start", &self.on_start.is_some())
            .field("cached_reads", &self.cached_reads)
            .finish()
    }
}

struct Jobs {
    queue: VecDeque<Slot>,
    stop: bool,
}

struct Done {
    queue: VecDeque<Slot>,
    /// Requests handed out and not yet on `queue`.
    out: usize,
}

struct Shared {
    jobs: Mutex<Jobs>,
    work: Condvar,
    done: Mutex<Done>,
    idle: Condvar,
    /// Written after each completion: the event loop polls it.
    done_evt: EventFd,
    #[cfg(test)]
    hold: (Mutex<bool>, Condvar),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The threads and their two queues.
pub struct Pool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Pool {
    /// Starts `options.threads` threads (at least one) named `name` working on `file`.
    /// Returns once each has run `options.on_start`.
    pub fn new(file: Arc<File>, name: &str, options: &IoOptions) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            jobs: Mutex::new(Jobs {
                queue: VecDeque::with_capacity(MAX_IN_FLIGHT),
                stop: false,
            }),
            work: Condvar::new(),
            done: Mutex::new(Done {
                queue: VecDeque::with_capacity(MAX_IN_FLIGHT),
                out: 0,
            }),
            idle: Condvar::new(),
            done_evt: ebb_devices::new_eventfd()?,
            #[cfg(test)]
            hold: (Mutex::new(false), Condvar::new()),
        });
        let mut pool = Self {
            shared,
            threads: Vec::new(),
        };
        for _ in 0..options.threads.max(1) {
            let shared = pool.shared.clone();
            let file = file.clone();
            let on_start = options.on_start.clone();
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            let thread = std::thread::Builder::new()
                .name(name.to_string())
                .stack_size(STACK_BYTES)
                .spawn(move || {
                    let ready = on_start.map_or(Ok(()), |f| f());
                    let ok = ready.is_ok();
                    let _ = ready_tx.send(ready);
                    if ok {
                        run(&shared, &file);
                    }
                })?;
            pool.threads.push(thread);
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(std::io::Error::other(e)),
                Err(_) => return Err(std::io::Error::other("an I/O thread failed to start")),
            }
        }
        Ok(pool)
    }

    /// Hands a request to the threads.
    pub fn submit(&self, slot: Slot) {
        lock(&self.shared.done).out += 1;
        lock(&self.shared.jobs).queue.push_back(slot);
        self.shared.work.notify_one();
    }

    /// The next finished request, if any.
    pub fn next_done(&self) -> Option<Slot> {
        lock(&self.shared.done).queue.pop_front()
    }

    /// Waits until every request handed out has finished (nothing of theirs touches
    /// guest RAM any more), then drops the finished ones unanswered.
    pub fn abandon_all(&self) {
        let mut done = lock(&self.shared.done);
        while done.out > 0 {
            done = self
                .shared
                .idle
                .wait(done)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        done.queue.clear();
    }

    /// The eventfd written after completions.
    pub fn done_evt(&self) -> &EventFd {
        &self.shared.done_evt
    }

    /// Wakes the event loop as a completion would (more work to pick up).
    pub fn wake(&self) {
        let _ = self.shared.done_evt.write(1);
    }

    /// Test hook: while held, threads take requests but do not run them.
    #[cfg(test)]
    pub(crate) fn hold(&self, held: bool) {
        let (m, cv) = &self.shared.hold;
        *lock(m) = held;
        cv.notify_all();
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        lock(&self.shared.jobs).stop = true;
        self.shared.work.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn run(shared: &Shared, file: &File) {
    loop {
        let mut slot = {
            let mut jobs = lock(&shared.jobs);
            loop {
                if let Some(slot) = jobs.queue.pop_front() {
                    break slot;
                }
                if jobs.stop {
                    return;
                }
                jobs = shared
                    .work
                    .wait(jobs)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        };
        #[cfg(test)]
        {
            let (m, cv) = &shared.hold;
            let mut held = lock(m);
            while *held {
                held = cv.wait(held).unwrap_or_else(|p| p.into_inner());
            }
        }
        slot.execute(file);
        let wake = {
            let mut done = lock(&shared.done);
            // The event loop reads the eventfd before it empties the queue: only the
            // completion that finds it empty needs to wake it.
            let wake = done.queue.is_empty();
            done.queue.push_back(slot);
            done.out -= 1;
            if done.out == 0 {
                shared.idle.notify_all();
            }
            wake
        };
        if wake {
            let _ = shared.done_evt.write(1);
        }
    }
}
