//! The vCPU threads: run the guest and hand its port I/O and MMIO exits to the buses.

use std::sync::Arc;

use ebb_devices::bus::Bus;
use ebb_devices::exit::{ExitSignal, VmExit};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::seccomp::{self, SeccompMode, ThreadKind};

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
    /// The system call filter to run under.
    pub seccomp: SeccompMode,
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

impl Vcpu {
    /// Runs the guest until the VM is asked to stop or this vCPU fails.
    pub fn run(mut self) {
        if let Err(e) = seccomp::install(ThreadKind::Vcpu, self.seccomp) {
            self.exit
                .request(VmExit::Crash(format!("vCPU {}: {e}", self.id)));
            return;
        }
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

    /// The size of one element of the port I/O exit KVM_RUN just returned (1, 2 or 4
    /// bytes; `rep ins/outs` move `count` of them in one exit).
    fn port_io_element_size(&mut self) -> usize {
        let run = self.fd.get_kvm_run();
        // SAFETY: called only after a KVM_EXIT_IO, so `io` is the union member the kernel
        // filled.
        let io = unsafe { run.__bindgen_anon_1.io };
        usize::from(io.size)
    }

    /// One KVM_RUN; returns why the VM must stop, if it must.
    fn run_once(&mut self) -> Option<VmExit> {
        let id = self.id;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                // The element size is in kvm_run, which `data` borrows: read it after.
                let (ptr, len) = (data.as_mut_ptr(), data.len());
                let element = self.port_io_element_size();
                // SAFETY: `ptr..ptr+len` is the data area KVM_RUN just handed out (in the
                // vCPU's kvm_run mapping, which lives as long as `self.fd`); it stays valid
                // until the next KVM_RUN and nothing else refers to it. Reading the element
                // size touched only kvm_run's `io` header, not this area.
                let data = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                port_read(&self.io_bus, port, data, element);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let (ptr, len) = (data.as_ptr(), data.len());
                let element = self.port_io_element_size();
                // SAFETY: as for IoIn above.
                let data = unsafe { std::slice::from_raw_parts(ptr, len) };
                port_write(&self.io_bus, port, data, element);
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

/// An IN of `data.len()` bytes, `element` bytes per access: one access for `in`, one per
/// element for `rep ins`. A port nobody claims reads as all ones (an ISA bus floats high).
fn port_read(bus: &Bus, port: u16, data: &mut [u8], element: usize) {
    for chunk in data.chunks_mut(element.max(1)) {
        if !bus.read(u64::from(port), chunk) {
            chunk.fill(0xff);
        }
    }
}

/// An OUT of `data`, `element` bytes per access (see [`port_read`]).
fn port_write(bus: &Bus, port: u16, data: &[u8], element: usize) {
    for chunk in data.chunks(element.max(1)) {
        bus.write(u64::from(port), chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebb_devices::bus::BusDevice;
    use std::sync::Mutex;

    /// Accesses seen: ('r' or 'w', width).
    type AccessLog = Arc<Mutex<Vec<(char, usize)>>>;

    /// Records every access's width, answers reads with its access count.
    #[derive(Default)]
    struct Port(AccessLog);

    impl BusDevice for Port {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            let mut log = self.0.lock().unwrap();
            log.push(('r', data.len()));
            data.fill(log.len() as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push(('w', data.len()));
        }
    }

    fn bus() -> (Bus, AccessLog) {
        let mut bus = Bus::new();
        let port = Port::default();
        let log = port.0.clone();
        bus.insert(Arc::new(Mutex::new(port)), 0x100, 4).unwrap();
        (bus, log)
    }

    /// `rep insw` of three words is three 2-byte reads, each landing in its own element;
    /// `rep outsb` of four bytes is four 1-byte writes.
    #[test]
    fn string_port_io_is_one_access_per_element() {
        let (bus, log) = bus();
        let mut data = [0u8; 6];
        port_read(&bus, 0x100, &mut data, 2);
        assert_eq!(data, [1, 1, 2, 2, 3, 3]);
        port_write(&bus, 0x100, &[1, 2, 3, 4], 1);
        port_write(&bus, 0x100, &[1, 2, 3, 4], 4);
        assert_eq!(
            *log.lock().unwrap(),
            [
                ('r', 2),
                ('r', 2),
                ('r', 2),
                ('w', 1),
                ('w', 1),
                ('w', 1),
                ('w', 1),
                ('w', 4)
            ]
        );
        // Nobody at the port: all ones.
        let mut data = [0u8; 4];
        port_read(&bus, 0x200, &mut data, 1);
        assert_eq!(data, [0xff; 4]);
    }
}
