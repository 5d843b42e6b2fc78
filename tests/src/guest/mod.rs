//! Spawns a VMM (Ebb, or QEMU as the peer) with the default guest and drives it over its
//! serial console, following resources/GUEST-PROTOCOL.md.
//!
//! Runs INSIDE a scenario: on a host with ordinary KVM, directly or in the nested test host
//! (see [`crate::testhost`]). The VMM's stdin/stdout are the guest's serial console; a
//! reader thread keeps the transcript and parses `EBB-READY`, `EBB-RESULT <json>` and
//! `EBB-EVENT <json>` lines.
//!
//! Set `EBB_GUEST_ECHO=1` to copy the console to stderr as it arrives (prefixed
//! `[guest] `), which shows a stuck guest live on the test host's console.
//!
//! One job per file, everything re-exported here:
//! - [`artifacts`]: the default guest (locating it, building it).
//! - [`binaries`]: the Ebb and QEMU binaries (finding them, building Ebb).
//! - [`config`]: what to boot ([`GuestConfig`], [`BalloonConfig`], [`KernelImage`], the
//!   kernel command line) and the VMM command for it.
//! - [`protocol`]: the console protocol (the `EBB-READY`, `EBB-RESULT` and `EBB-EVENT`
//!   markers).
//! - [`vm`]: a running guest ([`GuestVm`]): spawning it, commands, exit, signals, /proc
//!   readings.

pub mod artifacts;
pub mod binaries;
pub mod config;
pub mod protocol;
pub mod vm;

pub use crate::testhost::TRIPLE_FAULT_EXIT;
pub use crate::vmm::{Ebb, Qemu, Vmm, VmmKind, VmmRef};
pub use artifacts::{build_default_guest, GuestArtifacts};
pub use binaries::{build_ebb_binary, find_ebb_binary, find_qemu};
pub use config::{
    vmm_command, BalloonConfig, DiskSpec, GuestConfig, KernelImage, BASE_CMDLINE, BOOT_SPEEDUPS,
};
pub use protocol::{Ready, Received};
pub use vm::{EventView, GuestExit, GuestVm};

/// Lines of transcript/stderr in error messages.
const TAIL_LINES: usize = 40;

/// Failures to start or drive a guest. Every message says what happened and, for missing
/// pieces, how to get them.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Something needed is missing (artifact, binary, /dev/kvm).
    #[error("{0}")]
    Missing(String),
    /// The configuration asks for something this VMM kind cannot do (yet).
    #[error("{0}")]
    Unsupported(String),
    /// The VMM could not be started.
    #[error("{0}")]
    Spawn(String),
    /// The guest did not do what was expected in time.
    #[error("{0}")]
    Timeout(String),
    /// The VMM exited while something was expected from the guest.
    #[error("{0}")]
    Exited(String),
    /// The guest answered, but not as expected (a command with `ok: false`, ...).
    #[error("{0}")]
    Protocol(String),
    /// Talking to the VMM failed.
    #[error("{0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, GuestError>;
