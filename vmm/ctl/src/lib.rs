//! `ebb-ctl`: control a running Ebb VM through its API socket.
//!
//! ```text
//! ebb-ctl --api-socket PATH balloon set SIZE | balloon get | balloon stats |
//!         balloon interval SECS | vm info | vm shutdown | vm stop | metrics |
//!         bench [--requests N] [--idle-seconds S]        [--json] [--timeout SECS]
//! ```
//!
//! - [`client`]: a small blocking HTTP/1.1 client over a Unix socket (also used by the
//!   VMM's API tests and the end-to-end scenarios).
//! - [`cli`]: the command line, running a command, its output and exit status.
//! - [`failure`]: what went wrong, its message and exit status.
//! - [`render`]: the text printed for people. [`bench`]: `ebb-ctl bench`.
//!
//! The request and response bodies come from `ebb-api-model`; this crate does not link
//! the VMM.

pub mod bench;
pub mod cli;
pub mod client;
pub mod failure;
pub mod render;

pub use cli::{parse_args, run, Ctl};
pub use failure::{EXIT_API_ERROR, EXIT_NO_ANSWER, EXIT_USAGE};
