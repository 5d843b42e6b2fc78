//! The vCPU threads: run the guest and hand its port I/O and MMIO exits to the buses.

use std::sync::Arc;

use ebb_devices::bus::Bus;
use ebb_devices::exit::{ExitSignal, VmExit};
use kvm_ioctls::{VcpuExit, VcpuFd};

/// Everything a vCPU thread needs.
pub struct Vcpu {
    /// Index (also the APIC ID).
    pub id: u32,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Port I/O devices.
    pub io_bus: Arc<Bus>,
    /// MMIO devices.
    pub mmio_bus: Arc<Bus>,
    /// Where to report a stop.
    pub exit: Arc<ExitSignal>,
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

impl Vcpu {
    /// Runs the guest until the VM is asked to stop or this vCPU fails.
    pub fn run(mut self) {
        while !self.exit.is_requested() {
            if let Some(stop) = self.run_once() {
                self.exit.request(stop);
                return;
            }
        }
    }

    /// The registers that locate a crash: instruction and stack pointers, paging state and
    /// the last page-fault address.
    fn state_summary(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            // kvm-amd reinitialises the vCPU on a shutdown intercept: what is left is the
            // reset vector, not where the guest died.
            (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.selector == 0xf000 => {
                "registers lost: KVM reset the vCPU on shutdown (kvm-amd does)".to_string()
            }
            (Ok(r), Ok(s)) => format!(
                "rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} \
                 efer {:#x} cs {:#x} idt {:#x}/{:#x}",
                r.rip,
                r.rsp,
                r.rflags,
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer,
                s.cs.selector,
                s.idt.base,
                s.idt.limit
            ),
            (Err(e), _) | (_, Err(e)) => format!("registers unavailable: {e}"),
        }
    }

    /// One KVM_RUN; returns why the VM must stop, if it must.
    fn run_once(&mut self) -> Option<VmExit> {
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.io_bus.read(u64::from(port), data) {
                    // Nothing there: an ISA bus floats high.
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if data.len() <= 4 {
                    self.io_bus.write(u64::from(port), data);
                } else {
                    // String I/O (rep outsb): one byte at a time.
                    for b in data.chunks(1) {
                        self.io_bus.write(u64::from(port), b);
                    }
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio_bus.read(addr, data) {
                    tracing::debug!("vCPU {id}: read from unclaimed MMIO {addr:#x}");
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !self.mmio_bus.write(addr, data) {
                    tracing::debug!("vCPU {id}: write to unclaimed MMIO {addr:#x}");
                }
                None
            }
            Ok(VcpuExit::Shutdown) => {
                // Where the guest was is the first thing anyone debugging a crash asks.
                tracing::error!("vCPU {id}: triple fault; {}", self.state_summary());
                Some(VmExit::Crash(format!(
                    "vCPU {id}: triple fault (KVM_EXIT_SHUTDOWN)"
                )))
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(VmExit::PowerOff),
                KVM_SYSTEM_EVENT_RESET => Some(VmExit::Reset),
                KVM_SYSTEM_EVENT_CRASH => {
                    Some(VmExit::Crash(format!("vCPU {id}: guest reported a crash")))
                }
                other => Some(VmExit::Crash(format!(
                    "vCPU {id}: unexpected system event {other}"
                ))),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Crash(format!(
                "vCPU {id}: KVM could not enter the guest (hardware entry failure reason \
                 {reason:#x} on host CPU {cpu})"
            ))),
            Ok(VcpuExit::InternalError) => {
                let run = self.fd.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // union member the kernel filled.
                let internal = unsafe { run.__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                Some(VmExit::Crash(format!(
                    "vCPU {id}: KVM internal error (suberror {}, data {:x?})",
                    internal.suberror,
                    &internal.data[..n]
                )))
            }
            Ok(VcpuExit::Hlt) => Some(VmExit::Crash(format!(
                "vCPU {id}: unexpected HLT exit with the in-kernel irqchip"
            ))),
            Ok(VcpuExit::Intr) => None,
            Ok(other) => Some(VmExit::Crash(format!(
                "vCPU {id}: unexpected exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmExit::Crash(format!("vCPU {id}: KVM_RUN failed: {e}"))),
        }
    }
}
