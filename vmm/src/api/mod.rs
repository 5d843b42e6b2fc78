//! Ebb's REST API: HTTP/1.1 and JSON on a Unix socket (`ebb --api-socket PATH`).
//!
//! ```text
//!  client ──HTTP──> server (thread "ebb-api": tokio current-thread runtime, hyper, axum)
//!                      │ routes: parse, check, shape answers
//!                      │ Dispatcher::call(job)      job = FnOnce(&mut dyn VmBackend)
//!                      ▼
//!            mpsc channel + eventfd
//!                      ▼
//!  VMM event loop ── ApiHandler (event-manager subscriber) runs the job against the
//!                    VmBackend (the live VM: LiveVm; in tests: a fake) and answers
//!                    through a oneshot channel
//! ```
//!
//! - [`backend`]: the [`backend::VmBackend`] trait the API drives, its snapshots, errors.
//! - [`dispatch`]: the channel between the server thread and the event loop.
//! - [`routes`]: the endpoints. [`model`]: their answers, built from the backend's
//!   snapshots (the JSON shapes themselves are in `ebb-api-model`). [`metrics`]: Prometheus.
//! - [`server`]: the socket, the runtime thread, connection limits and timeouts.
//! - [`vm_backend`]: [`vm_backend::LiveVm`], the backend of a running VM.
//!
//! The API is described in `vmm/api-model/openapi.yaml` (`ebb_api_model::OPENAPI_YAML`);
//! the balloon endpoints are compatible with Firecracker's. The client, `ebb-ctl`, is its own
//! crate (`vmm/ctl`) and does not link the VMM.

pub mod backend;
pub mod dispatch;
pub mod metrics;
pub mod model;
pub mod routes;
pub mod server;
pub mod vm_backend;

pub use backend::{ApiError, VmBackend};
pub use dispatch::{ApiHandler, ApiQueue, Dispatcher};
pub use server::{ApiServer, ServerError, ServerOptions};

/// Starts the API server on `path`: returns the running server and the queue the VMM's
/// event loop serves (wrap it in an [`ApiHandler`] with the VM's backend).
pub fn start(
    path: &std::path::Path,
    options: ServerOptions,
) -> Result<(ApiServer, ApiQueue), ServerError> {
    let (dispatcher, queue) =
        dispatch::channel(options.reply_timeout).map_err(|source| ServerError::Io {
            path: path.to_path_buf(),
            what: "creating the request queue",
            source,
        })?;
    let server = ApiServer::start(path, dispatcher, options)?;
    Ok((server, queue))
}
