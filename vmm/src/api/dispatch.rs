//! How API requests reach the VM: the server thread sends a job (a closure over
//! `&mut dyn VmBackend`) through a channel and wakes the VMM's event loop with an eventfd;
//! [`ApiHandler`], an event-manager subscriber, runs the job there and the result goes
//! back through a oneshot channel.
//!
//! vCPU threads never see API work. A job that panics is contained: its caller gets a
//! 500 and the event loop keeps running.

use std::panic::{self, AssertUnwindSafe};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::backend::{ApiError, VmBackend};

/// Work for the event loop.
pub type Job = Box<dyn FnOnce(&mut dyn VmBackend) + Send>;

/// Jobs run per wake-up before the handler yields to other event sources.
const JOBS_PER_WAKE: usize = 32;

/// The server side of the channel: cheap to clone, one per handler invocation.
#[derive(Clone)]
pub struct Dispatcher {
    jobs: Sender<Job>,
    wake: Arc<EventFd>,
    reply_timeout: Duration,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("reply_timeout", &self.reply_timeout)
            .finish()
    }
}

/// The event-loop side of the channel.
pub struct ApiQueue {
    jobs: Receiver<Job>,
    wake: Arc<EventFd>,
}

impl std::fmt::Debug for ApiQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiQueue").finish_non_exhaustive()
    }
}

/// A connected [`Dispatcher`] and [`ApiQueue`]. A job not answered within
/// `reply_timeout` fails with 503.
pub fn channel(reply_timeout: Duration) -> std::io::Result<(Dispatcher, ApiQueue)> {
    let wake = Arc::new(ebb_devices::new_eventfd()?);
    let (tx, rx) = mpsc::channel();
    Ok((
        Dispatcher {
            jobs: tx,
            wake: wake.clone(),
            reply_timeout,
        },
        ApiQueue { jobs: rx, wake },
    ))
}

fn stopping() -> ApiError {
    ApiError::unavailable("the VMM is stopping")
}

impl Dispatcher {
    /// Runs `f` on the event loop and returns its result.
    pub async fn call<R, F>(&self, f: F) -> Result<R, ApiError>
    where
        F: FnOnce(&mut dyn VmBackend) -> R + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |vm| {
            // The caller may have given up (timeout, client gone): nothing to do then.
            let _ = tx.send(f(vm));
        });
        self.jobs.send(job).map_err(|_| stopping())?;
        // The counter cannot overflow in practice (one write per request).
        let _ = self.wake.write(1);
        match tokio::time::timeout(self.reply_timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            // The job was dropped unrun (the event loop ended) or panicked.
            Ok(Err(_)) => Err(stopping()),
            Err(_) => Err(ApiError::unavailable(format!(
                "the VMM did not answer within {} s",
                self.reply_timeout.as_secs_f64()
            ))),
        }
    }
}

impl ApiQueue {
    /// The eventfd that becomes readable when jobs are waiting.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Runs up to `max` waiting jobs against `backend`; returns how many ran and whether
    /// more are waiting.
    pub fn run_pending(&self, backend: &mut dyn VmBackend, max: usize) -> (usize, bool) {
        let _ = self.wake.read();
        for n in 0..max {
            match self.jobs.try_recv() {
                Ok(job) => {
                    let result = panic::catch_unwind(AssertUnwindSafe(|| job(&mut *backend)));
                    if result.is_err() {
                        tracing::error!("API: a request handler panicked; the request failed");
                    }
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => return (n, false),
            }
        }
        // Jobs left over: make sure the event loop comes back for them.
        let _ = self.wake.write(1);
        (max, true)
    }
}

/// The event-manager subscriber that runs API jobs on the VMM's event loop.
pub struct ApiHandler<B: VmBackend> {
    queue: ApiQueue,
    backend: B,
}

impl<B: VmBackend> ApiHandler<B> {
    /// A handler running `queue`'s jobs against `backend`.
    pub fn new(queue: ApiQueue, backend: B) -> Self {
        Self { queue, backend }
    }

    /// The backend (for tests).
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

impl<B: VmBackend> MutEventSubscriber for ApiHandler<B> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.queue.wake_fd(), EventSet::IN)) {
            tracing::error!("API: cannot watch the request queue: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.queue.run_pending(&mut self.backend, JOBS_PER_WAKE);
    }
}
