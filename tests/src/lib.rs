//! Ebb test host harness, end-to-end scenarios and benchmarks.
//!
//! - [`testhost`]: runs a scenario command on a host that can boot stock Linux guests:
//!   directly on an ordinary KVM host, or inside a nested emulated test host (QEMU TCG
//!   with SVM) where `/dev/kvm` is PVM or absent.
//! - [`guest`]: runs inside a scenario; spawns a VMM (Ebb or QEMU as the peer) with the
//!   default guest and drives it over its serial console (resources/GUEST-PROTOCOL.md):
//!   artifacts, binaries, configuration, console protocol and the running VM, one file
//!   each.
//! - [`procfs`]: memory readings from /proc without forking.
//! - [`density`]: the density benchmark (how many guests fit on a host).
//! - [`scenarios`]: the end-to-end scenarios (boot, CLI limits, balloon, reporting,
//!   benchmarks) that the runners (`ebb-scenario`, `ebb-bench`) and the integration
//!   tests run inside the test host.
//! - [`qmp`], [`madvise`]: driving QEMU over QMP; counting a VMM's discards with perf.
//! - [`results`]: the one result line protocol of every job (scenarios, demo, density).
//! - [`vmm`]: the `Vmm` trait, with Ebb and QEMU: command lines, balloon control (REST or
//!   QMP), power-off.
//! - [`util`]: median, MiB, polling, processes with a time limit.
//! - [`paths`]: where the repository, the cargo target directory and the cache are.

pub mod density;
pub mod guest;
pub mod madvise;
pub mod paths;
pub mod procfs;
pub mod qmp;
pub mod results;
pub mod scenarios;
pub mod testhost;
mod text;
pub mod util;
pub mod vmm;
