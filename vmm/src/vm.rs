//! Builds a VM from a [`VmConfig`] and runs it until it stops.

use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use ebb_balloon::policy::{AutoPolicy, PolicySettings};
use ebb_balloon::{Balloon, BalloonOptions, HintDiscard};
use ebb_block::{Block, DiskImage, ImageError, IoOptions};
use ebb_devices::acpi_pm::{self, AcpiPm};
use ebb_devices::bus::{lock, Bus, BusError};
use ebb_devices::cmos::{self, Cmos};
use ebb_devices::console_output::{ConsoleOutput, ConsoleWriter};
use ebb_devices::exit::{ExitSignal, VmExit};
use ebb_devices::ged::Ged;
use ebb_devices::i8042::{self, I8042};
use ebb_devices::serial::{self, RawStdout, SerialDevice, SerialOutput};
use ebb_devices::virtio::handler::VirtioHandler;
use ebb_devices::virtio::mmio::{self, MmioTransport};
use ebb_devices::virtio::{MmioInterrupt, VirtioDevice};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiError, GedInfo, MmioDeviceInfo};
use crate::api::vm_backend::{LiveVm, LiveVmParts};
use crate::api::{self, ApiHandler, ServerOptions};
use crate::boot::{self, BootError, BootSetup};
use crate::config::{format_size, BalloonConfig, SerialConfig, VmConfig, PAGE_SIZE};
use crate::console::ConsoleInput;
use crate::cpu::{self, CpuError};
use crate::host::{self, HostError};
use crate::layout;
use crate::memory::{guest_ram, GuestRam, MemoryError};
use crate::pressure::PsiFile;
use crate::seccomp::{self, ThreadKind};
use crate::signals::SignalWatcher;
use crate::vcpu::Vcpu;

/// Anything that stops a VM from starting.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The host cannot run guests.
    #[error(transparent)]
    Host(#[from] HostError),
    /// Kernel, initramfs or command line problems.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// A disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] ImageError),
    /// Guest RAM could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// vCPU setup failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// The configuration is not valid for this host.
    #[error("{0}")]
    Config(String),
    /// A KVM call failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// A host I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// Device wiring failed.
    #[error("device setup: {0}")]
    Bus(#[from] BusError),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Io { what, source }
}

/// What [`validate`] found and opened.
#[derive(Debug)]
pub struct Validated {
    /// The kernel.
    pub kernel: boot::KernelInfo,
    /// The initramfs and its size.
    pub initramfs: Option<(File, u64)>,
    /// The disk images, opened and locked, in `config.disks` order.
    pub disks: Vec<DiskImage>,
}

/// Checks what can be checked without KVM, in the order a user would fix things:
/// features not yet available, the kernel, the initramfs, memory against their needs,
/// the disk images (opened and locked here, before anything else is built).
pub fn validate(config: &VmConfig) -> Result<Validated, VmError> {
    if let Some(b) = &config.balloon {
        if b.size > config.memory.size {
            return Err(VmError::Config(format!(
                "--balloon size={} is larger than guest memory ({})",
                format_size(b.size),
                format_size(config.memory.size)
            )));
        }
        policy_settings(b, config.memory.size)?;
    }
    if config.cpus == 0 {
        return Err(VmError::Config("--cpus must be at least 1".into()));
    }
    crate::memory::check_backing(&config.memory)?;
    check_disks(config)?;
    let kernel = boot::inspect_kernel(&config.kernel)?;
    let initramfs = match &config.initramfs {
        Some(p) => Some(boot::open_initramfs(p)?),
        None => None,
    };
    boot::check_memory(
        &kernel,
        initramfs.as_ref().map(|(_, s)| *s).unwrap_or(0),
        config.memory.size,
    )?;
    let images: Vec<_> = config
        .disks
        .iter()
        .map(|d| (d.path.clone(), d.readonly))
        .collect();
    let disks = ebb_block::open_images(&images)?;
    Ok(Validated {
        kernel,
        initramfs,
        disks,
    })
}

/// The disks' configuration: not more devices than interrupts, one ID per disk.
fn check_disks(config: &VmConfig) -> Result<(), VmError> {
    let balloons = u32::from(config.balloon.is_some());
    let max_disks = layout::MAX_VIRTIO_DEVICES - balloons;
    if config.disks.len() > max_disks as usize {
        return Err(VmError::Config(format!(
            "{} disks are more than Ebb can attach: at most {max_disks}{} (one interrupt \
             each)",
            config.disks.len(),
            if balloons > 0 {
                " beside the balloon"
            } else {
                ""
            }
        )));
    }
    for (i, disk) in config.disks.iter().enumerate() {
        if let Some(first) = config.disks[..i].iter().find(|d| d.id == disk.id) {
            return Err(VmError::Config(format!(
                "disks '{}' and '{}' both have the id '{}': give one of them another \
                 (--disk path=...,id=NAME)",
                first.path.display(),
                disk.path.display(),
                disk.id
            )));
        }
    }
    Ok(())
}

/// The most vCPUs Ebb describes: xAPIC IDs in the MADT are one byte.
const MAX_XAPIC_CPUS: u32 = 255;

fn check_host_limits(
    kvm: &Kvm,
    config: &VmConfig,
    supported: &kvm_bindings::CpuId,
) -> Result<(), VmError> {
    let max = host::max_vcpus(kvm).min(MAX_XAPIC_CPUS);
    if config.cpus > max {
        return Err(VmError::Config(format!(
            "--cpus {} is more than this host allows: at most {max} vCPUs (KVM_CAP_MAX_VCPUS{})",
            config.cpus,
            if host::max_vcpus(kvm) > MAX_XAPIC_CPUS {
                ", capped at 255 by xAPIC IDs"
            } else {
                ""
            }
        )));
    }
    let bits = cpu::phys_address_bits(supported);
    let limit = 1u64 << bits;
    let end = layout::ram_end(config.memory.size);
    if end > limit {
        // RAM above 4 GiB starts past the hole, so the guest can have limit - 1 GiB.
        let max_mem = limit.saturating_sub(layout::MMIO_HOLE_END - layout::MMIO_HOLE_START);
        return Err(VmError::Config(format!(
            "--memory {} is more than this host can address: guest physical addresses are \
             limited to {bits} bits, which allows at most {} of guest memory",
            format_size(config.memory.size),
            format_size(max_mem)
        )));
    }
    Ok(())
}

/// Wakes the event loop when a stop is requested.
struct ExitWatcher(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.event(), EventSet::IN)) {
            tracing::error!("cannot watch for VM exit: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event().read();
    }
}

fn create_vm(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    for (slot, (gpa, size, host)) in ram.slots().into_iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: gpa.0,
            memory_size: size,
            userspace_addr: host,
            flags: 0,
        };
        // SAFETY: the host range is guest RAM, mapped for the life of the process and
        // not used for anything else.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(vm)
}

/// Puts `device` behind a virtio-mmio window: registers on the MMIO bus, its interrupt
/// as an irqfd, and its queue notifications as ioeventfds.
fn add_virtio_mmio<D: VirtioDevice + 'static>(
    vm: &VmFd,
    mmio_bus: &mut Bus,
    ram: &GuestRam,
    device: D,
    info: MmioDeviceInfo,
) -> Result<Arc<Mutex<MmioTransport<D>>>, VmError> {
    let irq = ebb_devices::new_eventfd().map_err(io_err("creating an eventfd"))?;
    vm.register_irqfd(&irq, info.irq)
        .map_err(kvm_err("KVM_IRQFD (virtio)"))?;
    let interrupt = Arc::new(MmioInterrupt::new(irq));
    let transport = MmioTransport::new(device, ram.clone(), interrupt)
        .map_err(io_err("creating the virtio-mmio transport"))?;
    for (index, notifier) in transport.notifiers().iter().enumerate() {
        vm.register_ioevent(
            notifier,
            &IoEventAddress::Mmio(info.base + mmio::QUEUE_NOTIFY_OFFSET),
            index as u32,
        )
        .map_err(kvm_err("KVM_IOEVENTFD (virtio)"))?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio_bus.insert(transport.clone(), info.base, info.size)?;
    Ok(transport)
}

/// Legacy devices on the port I/O bus: COM1, the i8042 reset line, the CMOS clock and
/// the ACPI power management registers.
struct LegacyDevices {
    io_bus: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    serial_drained: EventFd,
    /// Writes the console out; closed (what is left written) when the VM ends.
    console_writer: Option<ConsoleWriter>,
}

fn legacy_devices(
    vm: &VmFd,
    config: &VmConfig,
    exit: &Arc<ExitSignal>,
) -> Result<LegacyDevices, VmError> {
    let mut io_bus = Bus::new();
    let serial_irq = ebb_devices::new_eventfd().map_err(io_err("creating an eventfd"))?;
    vm.register_irqfd(&serial_irq, serial::COM1_IRQ)
        .map_err(kvm_err("KVM_IRQFD (serial)"))?;
    let seccomp = config.seccomp;
    let filter = move || seccomp::install(ThreadKind::Console, seccomp).map_err(|e| e.to_string());
    let spawned = match &config.serial {
        SerialConfig::Stdio => Some(ConsoleOutput::spawn(RawStdout, None, filter)),
        SerialConfig::File { path, max } => {
            let file = File::create(path).map_err(io_err(format!(
                "cannot open serial output file '{}'",
                path.display()
            )))?;
            Some(ConsoleOutput::spawn(file, Some(*max), filter))
        }
        SerialConfig::Off => None,
    };
    let (serial_output, console_writer) = match spawned {
        Some(spawned) => {
            let (output, writer) = spawned.map_err(io_err("starting the console thread"))?;
            (SerialOutput::Console(output), Some(writer))
        }
        None => (SerialOutput::Sink, None),
    };
    let (serial_dev, serial_drained) =
        SerialDevice::new(serial_irq, serial_output).map_err(io_err("creating the serial port"))?;
    let serial = Arc::new(Mutex::new(serial_dev));
    io_bus.insert(
        serial.clone(),
        u64::from(serial::COM1_PORT),
        u64::from(serial::COM1_PORT_LEN),
    )?;
    for port in [i8042::I8042_DATA_PORT, i8042::I8042_COMMAND_PORT] {
        io_bus.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone(), port))),
            u64::from(port),
            1,
        )?;
    }
    io_bus.insert(
        Arc::new(Mutex::new(Cmos::new())),
        u64::from(cmos::CMOS_PORT),
        u64::from(cmos::CMOS_PORT_LEN),
    )?;
    io_bus.insert(
        Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        u64::from(acpi_pm::PM_PORT_BASE),
        u64::from(acpi_pm::PM_PORT_LEN),
    )?;
    Ok(LegacyDevices {
        io_bus,
        serial,
        serial_drained,
        console_writer,
    })
}

/// Devices on the MMIO bus: virtio-mmio devices and the ACPI power button.
struct MmioDevices {
    mmio_bus: Bus,
    virtio: Vec<MmioDeviceInfo>,
    handlers: Vec<Box<dyn MutEventSubscriber + Send>>,
    balloon: Option<Arc<Mutex<MmioTransport<Balloon>>>>,
    disks: Vec<Arc<Mutex<MmioTransport<Block>>>>,
    ged: Arc<Mutex<Ged>>,
    ged_info: GedInfo,
}

/// The virtio-mmio window and interrupt of the `index`th virtio device.
fn virtio_slot(index: usize) -> MmioDeviceInfo {
    MmioDeviceInfo {
        base: layout::VIRTIO_MMIO_START + index as u64 * layout::VIRTIO_MMIO_SIZE,
        size: layout::VIRTIO_MMIO_SIZE,
        irq: layout::VIRTIO_FIRST_IRQ + index as u32,
    }
}

/// Gives a balloon with a statistics queue its automatic policy (on when the user asked
/// for `policy=auto`, else off until the API turns it on), its settings the defaults for
/// the guest's size with the user's knobs on top.
fn with_policy(mut device: Balloon, cfg: &BalloonConfig, ram: u64) -> Result<Balloon, VmError> {
    if cfg.stats_interval_s == 0 {
        return Ok(device);
    }
    let settings = policy_settings(cfg, ram)?;
    let pressure = PsiFile::open(Path::new(HOST_PRESSURE_FILE))
        .map(|p| Box::new(p) as Box<dyn ebb_balloon::policy::HostPressure>);
    device
        .set_policy(AutoPolicy::new(settings, cfg.policy.auto), pressure)
        .map_err(|e| VmError::Config(e.to_string()))?;
    Ok(device)
}

/// The policy's settings for a guest of `ram` bytes: the defaults for its size with the
/// user's knobs on top, checked.
fn policy_settings(cfg: &BalloonConfig, ram: u64) -> Result<PolicySettings, VmError> {
    let mut settings = PolicySettings::for_ram(ram);
    let knobs = cfg.policy;
    settings.headroom = knobs.headroom.unwrap_or(settings.headroom);
    settings.min = knobs.min.unwrap_or(settings.min);
    settings.max = knobs.max.unwrap_or(settings.max);
    settings.step = knobs.step.unwrap_or(settings.step);
    settings.fault_rate = knobs.fault_rate.unwrap_or(settings.fault_rate);
    settings.cooldown = knobs
        .cooldown_s
        .map_or(settings.cooldown, std::time::Duration::from_secs);
    settings.trim = knobs.trim.unwrap_or(settings.trim);
    settings
        .check(ram)
        .map_err(|e| VmError::Config(format!("--balloon: {e}")))?;
    Ok(settings)
}

/// Where the host's memory pressure is read.
const HOST_PRESSURE_FILE: &str = "/proc/pressure/memory";

/// Puts `device` in the next virtio-mmio slot, with its event loop handler.
fn add_virtio<D: VirtioDevice + 'static>(
    vm: &VmFd,
    ram: &GuestRam,
    devices: (&mut Bus, &mut Vec<MmioDeviceInfo>),
    handlers: &mut Vec<Box<dyn MutEventSubscriber + Send>>,
    device: D,
    what: &str,
) -> Result<Arc<Mutex<MmioTransport<D>>>, VmError> {
    let (mmio_bus, virtio) = devices;
    let info = virtio_slot(virtio.len());
    let transport = add_virtio_mmio(vm, mmio_bus, ram, device, info)?;
    handlers.push(Box::new(
        VirtioHandler::new(transport.clone()).map_err(io_err(format!("{what} event handler")))?,
    ));
    virtio.push(info);
    Ok(transport)
}

/// I/O threads per disk: [`ebb_block::pool::IO_THREADS`], or `EBB_DISK_IO_THREADS` (1 to
/// 64), a knob for measuring (`ebb-bench disk` compares settings with it).
fn io_threads() -> usize {
    std::env::var("EBB_DISK_IO_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| (1..=64).contains(n))
        .unwrap_or(ebb_block::pool::IO_THREADS)
}

/// Whether the event loop answers small cached reads itself: only with
/// `EBB_DISK_CACHED_READS=1` (a knob for measuring, as `EBB_DISK_IO_THREADS`; off by
/// default until it measures faster, see `ebb_block`).
fn cached_reads() -> bool {
    std::env::var("EBB_DISK_CACHED_READS").is_ok_and(|v| v == "1")
}

fn mmio_devices(
    vm: &VmFd,
    ram: &GuestRam,
    config: &VmConfig,
    images: Vec<DiskImage>,
) -> Result<MmioDevices, VmError> {
    let mut mmio_bus = Bus::new();
    let mut virtio = Vec::new();
    let mut handlers: Vec<Box<dyn MutEventSubscriber + Send>> = Vec::new();
    let mut balloon = None;
    if let Some(balloon_cfg) = &config.balloon {
        let target_pages = u32::try_from(balloon_cfg.size / PAGE_SIZE)
            .map_err(|_| VmError::Config("--balloon size is too large".into()))?;
        let device = Balloon::new(
            BalloonOptions {
                target_pages,
                deflate_on_oom: balloon_cfg.deflate_on_oom,
                free_page_reporting: balloon_cfg.free_page_reporting,
                stats_interval_s: balloon_cfg.stats_interval_s,
                free_page_hinting: balloon_cfg.free_page_hinting,
                hint_discard: if config.unchecked_hinting {
                    HintDiscard::Unchecked
                } else {
                    HintDiscard::Checked
                },
                deflate_prefault: balloon_cfg.deflate_prefault,
            },
            ram,
        )
        .map_err(|e| VmError::Config(e.to_string()))?;
        let device = with_policy(device, balloon_cfg, ram.size())?;
        let slots = (&mut mmio_bus, &mut virtio);
        balloon = Some(add_virtio(
            vm,
            ram,
            slots,
            &mut handlers,
            device,
            "balloon",
        )?);
    }
    // Disks after the balloon, in command-line order: the guest names them vda, vdb, ...
    // in the order it finds them.
    let mut disks = Vec::with_capacity(images.len());
    // Each disk's I/O threads run under their own filter from their first instruction.
    let seccomp = config.seccomp;
    let io = IoOptions {
        on_start: Some(Arc::new(move || {
            seccomp::install(ThreadKind::DiskIo, seccomp).map_err(|e| e.to_string())
        })),
        threads: io_threads(),
        cached_reads: cached_reads(),
    };
    for (image, cfg) in images.into_iter().zip(&config.disks) {
        let device = Block::new(image, &cfg.id, &io).map_err(io_err(format!(
            "starting the I/O threads of disk '{}'",
            cfg.id
        )))?;
        let slots = (&mut mmio_bus, &mut virtio);
        disks.push(add_virtio(vm, ram, slots, &mut handlers, device, "disk")?);
    }
    // The Generic Event Device (ACPI power button) on the first GSI after the virtio ones.
    let ged_info = GedInfo {
        base: layout::GED_MMIO_START,
        irq: layout::VIRTIO_FIRST_IRQ + virtio.len() as u32,
    };
    if ged_info.irq > layout::MAX_GSI {
        return Err(VmError::Config(
            "no interrupt left for the ACPI power button".into(),
        ));
    }
    let ged_irq = ebb_devices::new_eventfd().map_err(io_err("creating an eventfd"))?;
    vm.register_irqfd(&ged_irq, ged_info.irq)
        .map_err(kvm_err("KVM_IRQFD (GED)"))?;
    let ged = Arc::new(Mutex::new(Ged::new(ged_irq)));
    mmio_bus.insert(ged.clone(), ged_info.base, layout::GED_MMIO_SIZE)?;
    Ok(MmioDevices {
        mmio_bus,
        virtio,
        handlers,
        balloon,
        disks,
        ged,
        ged_info,
    })
}

/// Writes the firmware-like structures, the kernel, the initramfs and the command line.
fn load_guest(
    ram: &GuestRam,
    config: &VmConfig,
    kernel: &boot::KernelInfo,
    initramfs: Option<(File, u64)>,
    devices: &MmioDevices,
) -> Result<boot::BootEntry, VmError> {
    boot::write_reset_vector(ram.memory())?;
    let rsdp = acpi::write_tables(
        ram.memory(),
        config.cpus,
        &devices.virtio,
        Some(devices.ged_info),
    )?;
    // For kernels built with VIRTIO_MMIO_CMDLINE_DEVICES; others use the DSDT.
    let virtio_cmdline: Vec<String> = devices
        .virtio
        .iter()
        .map(|d| {
            format!(
                "virtio_mmio.device={}K@{:#x}:{}",
                d.size / 1024,
                d.base,
                d.irq
            )
        })
        .collect();
    let mut extra = virtio_cmdline;
    match boot::swiotlb_parameter(&config.cmdline) {
        Some(parameter) => {
            tracing::info!("guest swiotlb: off ({parameter}): no Ebb device needs bouncing");
            extra.push(parameter.to_string());
        }
        None => tracing::info!("guest swiotlb: as the command line asks"),
    }
    let cmdline = boot::build_cmdline(&config.cmdline, &extra, kernel.cmdline_max)?;
    let entry = boot::load(
        ram.memory(),
        BootSetup {
            kernel,
            initramfs,
            cmdline: &cmdline,
            memory_bytes: ram.size(),
            rsdp,
        },
    )?;
    tracing::info!("kernel entry: {entry:x?}");
    Ok(entry)
}

/// Creates and configures the vCPUs: all get CPUID/MSRs/LAPIC; the boot vCPU also gets
/// registers. The others wait for the guest's INIT/SIPI in the in-kernel LAPIC.
fn create_vcpus(
    vm: &VmFd,
    config: &VmConfig,
    supported: &kvm_bindings::CpuId,
    ram: &GuestRam,
    entry: boot::BootEntry,
    buses: (Arc<Bus>, Arc<Bus>),
    exit: &Arc<ExitSignal>,
) -> Result<Vec<Vcpu>, VmError> {
    let (io_bus, mmio_bus) = buses;
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        cpu::configure_vcpu(&fd, id, config.cpus, supported)?;
        if id == 0 {
            cpu::configure_boot_vcpu(&fd, ram.memory(), entry)?;
        }
        vcpus.push(Vcpu {
            id,
            fd,
            io_bus: io_bus.clone(),
            mmio_bus: mmio_bus.clone(),
            exit: exit.clone(),
            seccomp: config.seccomp,
        });
    }
    Ok(vcpus)
}

/// Builds the VM, runs it until it stops, and returns why it stopped.
pub fn run(config: &VmConfig, signal_fd: OwnedFd) -> Result<VmExit, VmError> {
    let Validated {
        kernel,
        initramfs,
        disks,
    } = validate(config)?;
    let started = Instant::now();
    // The API socket is claimed first so a busy socket fails the start before any work.
    // Requests wait until the event loop serves the queue; dropping the server (any
    // return from here) removes the socket.
    let (api_server, api_queue) = match &config.api_socket {
        Some(path) => {
            let options = ServerOptions {
                seccomp: config.seccomp,
                ..ServerOptions::default()
            };
            let (server, queue) =
                api::start(path, options).map_err(|e| VmError::Config(e.to_string()))?;
            (Some(server), Some(queue))
        }
        None => (None, None),
    };

    let kvm = host::open_kvm(&config.host)?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    check_host_limits(&kvm, config, &supported)?;

    let write_fence = config
        .balloon
        .is_some_and(|b| b.free_page_hinting && !config.unchecked_hinting);
    let ram = guest_ram(&config.memory, write_fence)?;
    tracing::info!(
        "guest RAM: {} at host {:#x}",
        format_size(ram.size()),
        ram.host_start()
    );
    let vm = create_vm(&kvm, &ram)?;
    let exit = Arc::new(ExitSignal::new().map_err(io_err("creating the exit eventfd"))?);
    let legacy = legacy_devices(&vm, config, &exit)?;
    let mut mmio = mmio_devices(&vm, &ram, config, disks)?;
    let entry = load_guest(&ram, config, &kernel, initramfs, &mmio)?;
    let buses = (
        Arc::new(legacy.io_bus),
        Arc::new(std::mem::take(&mut mmio.mmio_bus)),
    );
    let vcpus = create_vcpus(&vm, config, &supported, &ram, entry, buses, &exit)?;

    let mut events: EventManager<Box<dyn MutEventSubscriber + Send>> = EventManager::new()
        .map_err(|e| VmError::Io {
            what: "creating the event loop".into(),
            source: io::Error::other(format!("{e:?}")),
        })?;
    events.add_subscriber(Box::new(ExitWatcher(exit.clone())));
    events.add_subscriber(Box::new(SignalWatcher::new(signal_fd, exit.clone())));
    for handler in std::mem::take(&mut mmio.handlers) {
        events.add_subscriber(handler);
    }
    if let Some(queue) = api_queue {
        let backend = LiveVm::new(LiveVmParts {
            exit: exit.clone(),
            balloon: mmio.balloon.clone(),
            disks: mmio.disks.clone(),
            ged: Some(mmio.ged.clone()),
            started,
            config: config.clone(),
            ram_host_start: ram.host_start(),
            ram_bytes: ram.size(),
        });
        events.add_subscriber(Box::new(ApiHandler::new(queue, backend)));
    }
    if config.serial == SerialConfig::Stdio {
        events.add_subscriber(Box::new(ConsoleInput::new(
            legacy.serial.clone(),
            legacy.serial_drained,
        )));
    }

    for vcpu in vcpus {
        let name = format!("vcpu{}", vcpu.id);
        thread::Builder::new()
            .name(name)
            .spawn(move || vcpu.run())
            .map_err(io_err("starting a vCPU thread"))?;
    }

    // Everything is built and every other thread started: from here the main thread only
    // runs the event loop and the shutdown.
    seccomp::install(ThreadKind::EventLoop, config.seccomp)
        .map_err(|e| VmError::Config(e.to_string()))?;
    while !exit.is_requested() {
        if let Err(e) = events.run() {
            tracing::warn!("event loop: {e:?}");
        }
    }
    // Unserved API requests fail (503) when the event loop goes; in-flight answers get
    // a moment to reach their clients before the socket is removed.
    drop(events);
    drop(api_server);
    lock(&legacy.serial).flush();
    if let Some(mut writer) = legacy.console_writer {
        writer.close();
    }
    // Guest RAM is never unmapped, so vCPU threads still in KVM_RUN stay safe until the
    // process exits.
    Ok(exit.reason().unwrap_or(VmExit::Stopped("unknown".into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slot 0 is where the balloon always was; every slot is its own window and GSI,
    /// below the GED's window and before its GSI.
    #[test]
    fn virtio_slots_are_distinct_and_leave_room_for_the_power_button() {
        let first = virtio_slot(0);
        assert_eq!((first.base, first.irq), (0xd000_0000, 5));
        let last = virtio_slot(layout::MAX_VIRTIO_DEVICES as usize - 1);
        assert_eq!(last.irq + 1, layout::MAX_GSI, "the GED takes the next GSI");
        assert_eq!(last.base, 0xd000_0000 + 17 * 0x1000);
        assert!(layout::GED_MMIO_START + layout::GED_MMIO_SIZE <= first.base);
        assert!(last.base + last.size <= layout::IOAPIC_START);
    }
}
