//! Ebb's device models.
//!
//! Every device here is independent of KVM: a vCPU thread hands port and MMIO accesses to a
//! [`bus::Bus`], and devices report what the VMM must do (power off, reset) through an
//! [`exit::ExitSignal`]. This keeps them unit-testable without a VM.

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod console_output;
pub mod exit;
pub mod faults;
pub mod ged;
pub mod i8042;
pub mod ram;
pub mod serial;
pub mod virtio;
pub mod write_fence;

/// A non-blocking eventfd that a child process does not inherit (vmm-sys-util's
/// `EventFd::new` leaves close-on-exec to its caller).
pub fn new_eventfd() -> std::io::Result<vmm_sys_util::eventfd::EventFd> {
    vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK | libc::EFD_CLOEXEC)
}
