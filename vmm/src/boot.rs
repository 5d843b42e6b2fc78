//! Kernel, initramfs and command line loading, and the boot structures the kernel reads:
//! the Linux zero page (64-bit boot protocol) or the PVH start info.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryMmap, ReadVolatile};

use crate::config::{format_size, MIB, PAGE_SIZE};
use crate::layout::{self, E820Entry};

/// Boot protocol magic values.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
const XLF_KERNEL_64: u16 = 1 << 0;
/// The earliest protocol with the 64-bit entry point and `xloadflags`.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const EM_X86_64: u16 = 62;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Where the kernel's 64-bit entry sits in the protected-mode code of a bzImage.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Default initrd ceiling for kernels that do not say (and for ELF kernels).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// Memory the kernel needs beyond its image and the initramfs before it can run init.
const KERNEL_WORKING_ROOM: u64 = 16 * MIB;

/// Problems with the kernel, initramfs or command line.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file does not exist.
    #[error("kernel image '{0}' not found")]
    KernelMissing(PathBuf),
    /// The kernel file cannot be read.
    #[error("cannot read kernel image '{path}': {source}")]
    KernelUnreadable {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// The file is not a kernel Ebb can boot.
    #[error("'{path}' is not a bootable x86_64 Linux kernel: {why}")]
    NotAKernel {
        /// Path.
        path: PathBuf,
        /// Explanation.
        why: String,
    },
    /// The initramfs file does not exist.
    #[error("initramfs '{0}' not found")]
    InitramfsMissing(PathBuf),
    /// The initramfs cannot be read.
    #[error("cannot read initramfs '{path}': {source}")]
    InitramfsUnreadable {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Guest memory is too small for kernel and initramfs.
    #[error(
        "guest memory {memory} is too small for this kernel and initramfs: they need at \
         least {needed} (kernel {kernel}, initramfs {initramfs}, plus {room} working room)"
    )]
    MemoryTooSmall {
        /// Configured.
        memory: String,
        /// Required.
        needed: String,
        /// Kernel footprint.
        kernel: String,
        /// Initramfs size.
        initramfs: String,
        /// Headroom.
        room: String,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line rejected: {0}")]
    Cmdline(String),
    /// Loading into guest memory failed.
    #[error("loading the kernel into guest memory failed: {0}")]
    Load(String),
}

/// Kernel image formats Ebb boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A compressed bzImage, entered through its 64-bit entry point.
    BzImage,
    /// An uncompressed ELF vmlinux, entered through PVH when it has the note, otherwise
    /// through its 64-bit entry point.
    Elf,
}

/// What was learnt from a kernel file before any memory exists.
#[derive(Debug, Clone)]
pub struct KernelInfo {
    /// File path.
    pub path: PathBuf,
    /// Format.
    pub format: KernelFormat,
    /// Guest physical end of what the kernel occupies while booting.
    pub footprint_end: u64,
    /// Highest address (inclusive) the kernel accepts an initrd at.
    pub initrd_addr_max: u64,
    /// Longest command line the kernel accepts, including the terminating NUL.
    pub cmdline_max: usize,
}

fn open_kernel(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => BootError::KernelMissing(path.to_path_buf()),
        _ => BootError::KernelUnreadable {
            path: path.to_path_buf(),
            source: e,
        },
    })
}

fn not_a_kernel(path: &Path, why: impl Into<String>) -> BootError {
    BootError::NotAKernel {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
    file.seek(SeekFrom::Start(offset))?;
    match file.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Identifies the kernel format and its memory needs.
pub fn inspect_kernel(path: &Path) -> Result<KernelInfo, BootError> {
    let mut file = open_kernel(path)?;
    let unreadable = |source| BootError::KernelUnreadable {
        path: path.to_path_buf(),
        source,
    };
    if file.metadata().map_err(unreadable)?.is_dir() {
        return Err(not_a_kernel(path, "it is a directory"));
    }
    let mut magic = [0u8; 4];
    if read_at(&mut file, 0, &mut magic).map_err(unreadable)? && magic == ELF_MAGIC {
        return inspect_elf(path, &mut file);
    }
    let mut hdr = setup_header::default();
    let complete = read_at(&mut file, 0x1f1, hdr.as_mut_slice()).map_err(unreadable)?;
    if !complete || hdr.header != HDRS_MAGIC {
        return Err(not_a_kernel(
            path,
            "neither an ELF vmlinux nor a bzImage (no 'HdrS' boot header)",
        ));
    }
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(not_a_kernel(
            path,
            format!(
                "bzImage has no 64-bit entry point (boot protocol {}.{:02}); Ebb boots \
                 64-bit kernels with protocol 2.12 or later",
                version >> 8,
                version & 0xff
            ),
        ));
    }
    let pref_address = hdr.pref_address.max(HIGH_LOAD_DEFAULT);
    let init_size = u64::from(hdr.init_size);
    let initrd_addr_max = match hdr.initrd_addr_max {
        0 => DEFAULT_INITRD_ADDR_MAX,
        n => u64::from(n),
    };
    let cmdline_max = match hdr.cmdline_size {
        0 => 256,
        n => (n as usize).saturating_add(1).min(layout::CMDLINE_MAX_SIZE),
    };
    Ok(KernelInfo {
        path: path.to_path_buf(),
        format: KernelFormat::BzImage,
        footprint_end: pref_address + init_size,
        initrd_addr_max,
        cmdline_max,
    })
}

/// LOAD_PHYSICAL_ADDR of x86_64 kernels, used when the header gives no preference.
const HIGH_LOAD_DEFAULT: u64 = 16 * MIB;

fn inspect_elf(path: &Path, file: &mut File) -> Result<KernelInfo, BootError> {
    let unreadable = |source| BootError::KernelUnreadable {
        path: path.to_path_buf(),
        source,
    };
    let mut ehdr = [0u8; 64];
    if !read_at(file, 0, &mut ehdr).map_err(unreadable)? {
        return Err(not_a_kernel(path, "truncated ELF header"));
    }
    if ehdr[4] != 2 || ehdr[5] != 1 {
        return Err(not_a_kernel(path, "ELF file is not 64-bit little-endian"));
    }
    let machine = u16::from_le_bytes([ehdr[18], ehdr[19]]);
    if machine != EM_X86_64 {
        return Err(not_a_kernel(
            path,
            format!("ELF machine {machine} is not x86_64"),
        ));
    }
    let phoff = u64::from_le_bytes(ehdr[32..40].try_into().unwrap_or_default());
    let phentsize = u64::from(u16::from_le_bytes([ehdr[54], ehdr[55]]));
    let phnum = u64::from(u16::from_le_bytes([ehdr[56], ehdr[57]]));
    if phnum == 0 || phentsize < 56 {
        return Err(not_a_kernel(path, "ELF file has no program headers"));
    }
    let mut end = 0u64;
    for i in 0..phnum.min(256) {
        let mut ph = [0u8; 56];
        let off = phoff.saturating_add(i * phentsize);
        if !read_at(file, off, &mut ph).map_err(unreadable)? {
            return Err(not_a_kernel(path, "truncated ELF program headers"));
        }
        let p_type = u32::from_le_bytes(ph[0..4].try_into().unwrap_or_default());
        let paddr = u64::from_le_bytes(ph[24..32].try_into().unwrap_or_default());
        let memsz = u64::from_le_bytes(ph[40..48].try_into().unwrap_or_default());
        if p_type == 1 {
            end = end.max(paddr.saturating_add(memsz));
        }
    }
    if end == 0 {
        return Err(not_a_kernel(path, "ELF file has no loadable segments"));
    }
    Ok(KernelInfo {
        path: path.to_path_buf(),
        format: KernelFormat::Elf,
        footprint_end: end,
        initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
        cmdline_max: 2048,
    })
}

/// Opens the initramfs and returns it with its size.
pub fn open_initramfs(path: &Path) -> Result<(File, u64), BootError> {
    let file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => BootError::InitramfsMissing(path.to_path_buf()),
        _ => BootError::InitramfsUnreadable {
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    let meta = file
        .metadata()
        .map_err(|e| BootError::InitramfsUnreadable {
            path: path.to_path_buf(),
            source: e,
        })?;
    if meta.is_dir() {
        return Err(BootError::InitramfsUnreadable {
            path: path.to_path_buf(),
            source: io::Error::other("it is a directory"),
        });
    }
    Ok((file, meta.len()))
}

fn align_up(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

/// Checks that `memory_bytes` holds the kernel, the initramfs and some room to run.
pub fn check_memory(
    kernel: &KernelInfo,
    initramfs_size: u64,
    memory_bytes: u64,
) -> Result<(), BootError> {
    let kernel_bytes = align_up(kernel.footprint_end, 2 * MIB);
    let initrd_bytes = align_up(initramfs_size, PAGE_SIZE);
    let needed = (kernel_bytes + initrd_bytes + KERNEL_WORKING_ROOM).max(layout::MIN_MEMORY);
    if memory_bytes < needed {
        return Err(BootError::MemoryTooSmall {
            memory: format_size(memory_bytes),
            needed: format_size(needed),
            kernel: format_size(kernel_bytes),
            initramfs: format_size(initrd_bytes),
            room: format_size(KERNEL_WORKING_ROOM),
        });
    }
    Ok(())
}

/// What Ebb adds to the guest's command line about the swiotlb bounce buffer.
///
/// A Linux guest with RAM above 4 GiB sets aside and zeroes a 64 MiB bounce buffer at
/// boot, for devices that cannot reach all of memory. No Ebb device needs it: none offers
/// VIRTIO_F_ACCESS_PLATFORM, so virtio uses guest-physical addresses directly. Measured in
/// the nested test host, a 5 GiB idle guest cost the host 290 MiB with the buffer and 223
/// MiB without. A device that needs bouncing (an emulated DMA-limited device, a
/// confidential guest) must turn this off where it is configured.
pub fn swiotlb_parameter(user_cmdline: &str) -> Option<&'static str> {
    let user_sets_it = user_cmdline
        .split_whitespace()
        .any(|p| p.starts_with("swiotlb="));
    (!user_sets_it).then_some("swiotlb=noforce")
}

/// Builds the kernel command line, checking it against the kernel's limit.
pub fn build_cmdline(text: &str, extra: &[String], max_len: usize) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(max_len).map_err(|e| BootError::Cmdline(format!("{e}")))?;
    let total: usize = text.len() + extra.iter().map(|s| s.len() + 1).sum::<usize>();
    if total + 1 > max_len {
        return Err(BootError::Cmdline(format!(
            "{total} bytes, but this kernel accepts at most {}",
            max_len - 1
        )));
    }
    for part in std::iter::once(text).chain(extra.iter().map(String::as_str)) {
        if part.trim().is_empty() {
            continue;
        }
        cmdline
            .insert_str(part)
            .map_err(|e| BootError::Cmdline(format!("'{part}': {e}")))?;
    }
    Ok(cmdline)
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// 64-bit long mode at `rip`, with `rsi` pointing at the zero page.
    Long64 {
        /// Entry point.
        rip: u64,
        /// Zero page address.
        zero_page: u64,
    },
    /// PVH: 32-bit protected mode at `rip`, with `rbx` pointing at the start info.
    Pvh {
        /// Entry point.
        rip: u64,
        /// hvm_start_info address.
        start_info: u64,
    },
}

/// Everything the loader needs besides guest memory.
pub struct BootSetup<'a> {
    /// The inspected kernel.
    pub kernel: &'a KernelInfo,
    /// The initramfs, if any.
    pub initramfs: Option<(File, u64)>,
    /// The command line.
    pub cmdline: &'a Cmdline,
    /// Guest memory size.
    pub memory_bytes: u64,
    /// Guest physical address of the ACPI RSDP.
    pub rsdp: u64,
}

/// Loads kernel, initramfs and command line into `mem` and writes the boot structures.
pub fn load(mem: &GuestMemoryMmap, setup: BootSetup<'_>) -> Result<BootEntry, BootError> {
    let kernel = setup.kernel;
    let mut file = open_kernel(&kernel.path)?;
    let load_err = |e: linux_loader::loader::Error| BootError::Load(e.to_string());
    let result = match kernel.format {
        KernelFormat::BzImage => BzImage::load(
            mem,
            None,
            &mut file,
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(load_err)?,
        KernelFormat::Elf => Elf::load(
            mem,
            None,
            &mut file,
            Some(GuestAddress(layout::HIMEM_START)),
        )
        .map_err(load_err)?,
    };

    let initrd = match setup.initramfs {
        Some((mut f, size)) => Some(load_initramfs(
            mem,
            kernel,
            &mut f,
            size,
            setup.memory_bytes,
        )?),
        None => None,
    };

    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), setup.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = setup
        .cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);

    let e820 = layout::e820_map(setup.memory_bytes);
    match (kernel.format, result.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(entry)) => {
            write_pvh_start_info(mem, &e820, initrd, setup.rsdp)?;
            Ok(BootEntry::Pvh {
                rip: entry.raw_value(),
                start_info: layout::PVH_INFO_START,
            })
        }
        _ => {
            let hdr = result.setup_header.unwrap_or_else(elf_setup_header);
            write_zero_page(mem, hdr, &e820, initrd, cmdline_len, setup.rsdp)?;
            let rip = match kernel.format {
                KernelFormat::BzImage => {
                    result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET
                }
                KernelFormat::Elf => result.kernel_load.raw_value(),
            };
            Ok(BootEntry::Long64 {
                rip,
                zero_page: layout::ZERO_PAGE_START,
            })
        }
    }
}

/// Real-mode code at the reset vector that asks for a reset through the ACPI reset
/// register: `mov al, RESET_VALUE; mov dx, port; out dx, al; hlt; jmp $-1`.
///
/// Linux on a hardware-reduced ACPI machine without EFI reboots by jumping to the BIOS
/// reset vector (its "BOOT_BIOS" method); with nothing there the guest would spin in
/// zeroed memory instead of rebooting.
pub fn reset_vector_stub() -> [u8; 9] {
    let port =
        (ebb_devices::acpi_pm::PM_PORT_BASE + ebb_devices::acpi_pm::RESET_OFFSET).to_le_bytes();
    [
        0xb0,
        ebb_devices::acpi_pm::RESET_VALUE,
        0xba,
        port[0],
        port[1],
        0xee,
        0xf4,
        0xeb,
        0xfd,
    ]
}

/// Writes [`reset_vector_stub`] at the reset vector.
pub fn write_reset_vector(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    mem.write_slice(&reset_vector_stub(), GuestAddress(layout::RESET_VECTOR))
        .map_err(|e| BootError::Load(format!("reset vector: {e}")))
}

/// A setup header for ELF kernels entered at their 64-bit entry, which have none.
fn elf_setup_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG_MAGIC,
        header: HDRS_MAGIC,
        kernel_alignment: 0x100_0000,
        ..Default::default()
    }
}

/// Places the initramfs as high as the kernel allows below the MMIO hole, page aligned.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    kernel: &KernelInfo,
    file: &mut File,
    size: u64,
    memory_bytes: u64,
) -> Result<(u64, u64), BootError> {
    let low_ram_end = layout::ram_regions(memory_bytes)[0].1;
    let ceiling = low_ram_end.min(kernel.initrd_addr_max.saturating_add(1));
    let too_small = || BootError::MemoryTooSmall {
        memory: format_size(memory_bytes),
        needed: format_size(
            align_up(kernel.footprint_end, 2 * MIB)
                + align_up(size, PAGE_SIZE)
                + KERNEL_WORKING_ROOM,
        ),
        kernel: format_size(align_up(kernel.footprint_end, 2 * MIB)),
        initramfs: format_size(align_up(size, PAGE_SIZE)),
        room: format_size(KERNEL_WORKING_ROOM),
    };
    let addr = ceiling
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .ok_or_else(too_small)?;
    if addr < align_up(kernel.footprint_end, 2 * MIB) {
        return Err(too_small());
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|e| BootError::InitramfsUnreadable {
            path: PathBuf::from("initramfs"),
            source: e,
        })?;
    let len = usize::try_from(size).map_err(|_| too_small())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut ReadVolatileFile(file), len)
        .map_err(|e| BootError::Load(format!("initramfs: {e}")))?;
    Ok((addr, size))
}

/// Adapts `File` to vm-memory's volatile reads.
struct ReadVolatileFile<'a>(&'a mut File);

impl ReadVolatile for ReadVolatileFile<'_> {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        self.0.read_volatile(buf)
    }
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    mut hdr: setup_header,
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
    rsdp: u64,
) -> Result<(), BootError> {
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    let mut params = boot_params {
        hdr,
        acpi_rsdp_addr: rsdp,
        ..Default::default()
    };
    if e820.len() > params.e820_table.len() {
        return Err(BootError::Load("too many E820 entries".into()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = e820.len() as u8;
    let boot = BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
        .map_err(|e| BootError::Load(e.to_string()))
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), BootError> {
    if e820.len() > layout::PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::Load(
            "too many memory map entries for PVH".into(),
        ));
    }
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            layout::PVH_MODLIST_START
        } else {
            0
        },
        ..Default::default()
    };
    let mut boot = BootParams::new::<hvm_start_info>(&info, GuestAddress(layout::PVH_INFO_START));
    boot.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    if let Some((addr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        boot.set_modules::<hvm_modlist_entry>(&[module], GuestAddress(layout::PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&boot, mem)
        .map_err(|e| BootError::Load(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ebb-boot-{}-{name}", std::process::id()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    /// A minimal bzImage header: setup sectors, "HdrS", protocol and flags.
    fn fake_bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut img = vec![0u8; 0x4000];
        img[0x1f1] = 4; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&BOOT_FLAG_MAGIC.to_le_bytes());
        img[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
        img[0x258..0x260].copy_from_slice(&(16 * MIB).to_le_bytes()); // pref_address
        img[0x260..0x264].copy_from_slice(&(40 * MIB as u32).to_le_bytes()); // init_size
        img
    }

    #[test]
    fn the_swiotlb_is_turned_off_unless_the_user_sets_it() {
        assert_eq!(
            swiotlb_parameter("console=ttyS0 panic=-1"),
            Some("swiotlb=noforce")
        );
        assert_eq!(swiotlb_parameter(""), Some("swiotlb=noforce"));
        assert_eq!(swiotlb_parameter("console=ttyS0 swiotlb=65536"), None);
        assert_eq!(swiotlb_parameter("swiotlb=force quiet"), None);
        // Only a parameter of that name counts.
        assert_eq!(swiotlb_parameter("foo.swiotlb=1"), Some("swiotlb=noforce"));
    }

    #[test]
    fn recognises_a_bzimage_and_its_needs() {
        let p = temp_file("bz", &fake_bzimage(0x020f, 1));
        let info = inspect_kernel(&p).unwrap();
        assert_eq!(info.format, KernelFormat::BzImage);
        assert_eq!(info.footprint_end, 56 * MIB);
        assert_eq!(info.cmdline_max, 2048);
        assert!(check_memory(&info, 10 * MIB, 128 * MIB).is_ok());
        let e = check_memory(&info, 10 * MIB, 64 * MIB)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too small") && e.contains("82 MiB"), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn rejects_old_or_32_bit_bzimages() {
        let p = temp_file("bz32", &fake_bzimage(0x020f, 0));
        let e = inspect_kernel(&p).unwrap_err().to_string();
        assert!(e.contains("64-bit entry"), "{e}");
        std::fs::remove_file(p).unwrap();
        let p = temp_file("bzold", &fake_bzimage(0x0206, 1));
        assert!(inspect_kernel(&p).is_err());
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let p = temp_file("text", b"#!/bin/sh\necho hello\n");
        let e = inspect_kernel(&p).unwrap_err().to_string();
        assert!(e.contains("not a bootable") && e.contains("HdrS"), "{e}");
        std::fs::remove_file(p).unwrap();
        let p = temp_file("empty", b"");
        assert!(matches!(
            inspect_kernel(&p),
            Err(BootError::NotAKernel { .. })
        ));
        std::fs::remove_file(p).unwrap();
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(&ELF_MAGIC);
        elf[4] = 2;
        elf[5] = 1;
        elf[18] = 183; // aarch64
        let p = temp_file("arm", &elf);
        assert!(inspect_kernel(&p)
            .unwrap_err()
            .to_string()
            .contains("not x86_64"));
        std::fs::remove_file(p).unwrap();
        assert!(matches!(
            inspect_kernel(Path::new("/nonexistent/vmlinuz")),
            Err(BootError::KernelMissing(_))
        ));
        assert!(matches!(
            inspect_kernel(Path::new("/")),
            Err(BootError::NotAKernel { .. })
        ));
        assert!(matches!(
            open_initramfs(Path::new("/nonexistent/initrd")),
            Err(BootError::InitramfsMissing(_))
        ));
    }

    #[test]
    fn reset_stub_targets_the_acpi_reset_register() {
        let stub = reset_vector_stub();
        assert_eq!(stub[1], ebb_devices::acpi_pm::RESET_VALUE);
        assert_eq!(u16::from_le_bytes([stub[3], stub[4]]), 0x602);
        assert!(layout::RESET_VECTOR + stub.len() as u64 <= layout::ACPI_END);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        write_reset_vector(&mem).unwrap();
        let mut back = [0u8; 9];
        mem.read_slice(&mut back, GuestAddress(0xf_fff0)).unwrap();
        assert_eq!(back, stub);
    }

    #[test]
    fn command_line_limits() {
        let c = build_cmdline(
            "console=ttyS0",
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
            2048,
        )
        .unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
        let long = "x".repeat(3000);
        let e = build_cmdline(&long, &[], 2048).unwrap_err().to_string();
        assert!(e.contains("at most 2047"), "{e}");
    }
}
