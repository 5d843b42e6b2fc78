//! A hostile balloon driver, for testing that a VMM survives one: `hostile MODE SECS`.
//!
//! Takes the balloon away from Linux (unbinds its virtio-mmio platform device), maps the
//! device's registers through /dev/mem, puts the rings in pages of its own (physical
//! addresses from /proc/self/pagemap), and for SECS seconds keeps a queue's available ring
//! full and kicks it:
//!
//! - `inflate`: every entry names one 16-descriptor chain of 4 KiB PFN arrays (16,384 PFNs
//!   per chain, all naming pages of a victim buffer of this process);
//! - `report`: chains of 16 device-writable 4 KiB descriptors into the victim buffer;
//! - `stats`: one 64-byte statistics buffer per entry;
//! - `malformed`: chains of random descriptors (addresses anywhere, huge lengths, wrong
//!   directions, loops, indirect flags).
//!
//! A bystander buffer, filled with a pattern before and checked after, shows that the
//! device touched no memory it was not given. The result says how many buffers the
//! device completed (its used index) and whether the bystander is intact.

use std::fs;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const QUEUE_SIZE: u16 = 256;
/// The longest a full ring goes without a kick.
const KICK_INTERVAL: Duration = Duration::from_millis(1);

// virtio-mmio registers.
const DEVICE_FEATURES: usize = 0x10;
const DEVICE_FEATURES_SEL: usize = 0x14;
const DRIVER_FEATURES: usize = 0x20;
const DRIVER_FEATURES_SEL: usize = 0x24;
const QUEUE_SEL: usize = 0x30;
const QUEUE_NUM_MAX: usize = 0x34;
const QUEUE_NUM: usize = 0x38;
const QUEUE_READY: usize = 0x44;
const QUEUE_NOTIFY: usize = 0x50;
const STATUS: usize = 0x70;
const QUEUE_DESC: usize = 0x80;
const QUEUE_AVAIL: usize = 0x90;
const QUEUE_USED: usize = 0xa0;

const F_STATS_VQ: u64 = 1 << 1;
const F_PAGE_REPORTING: u64 = 1 << 5;
const F_VERSION_1: u64 = 1 << 32;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;

/// What the flood did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub mode: String,
    pub secs: f64,
    /// Buffers the device returned (its used index advanced by this much).
    pub completed: u64,
    /// Kicks written.
    pub kicks: u64,
    /// The device's status register at the end (DEVICE_NEEDS_RESET is 0x40).
    pub final_status: u32,
    /// The bystander pages still hold their pattern.
    pub bystander_intact: bool,
    /// The kernel moved one of the pages the device was given (the run proves nothing).
    pub pages_moved: bool,
}

/// Flood modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Inflate,
    Report,
    Stats,
    Malformed,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "inflate" => Some(Mode::Inflate),
            "report" => Some(Mode::Report),
            "stats" => Some(Mode::Stats),
            "malformed" => Some(Mode::Malformed),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Inflate => "inflate",
            Mode::Report => "report",
            Mode::Stats => "stats",
            Mode::Malformed => "malformed",
        }
    }
}

/// Pages of this process, locked, with their guest-physical addresses.
struct Pages {
    ptr: *mut u8,
    len: usize,
    phys: Vec<u64>,
}

impl Pages {
    fn new(count: usize) -> Result<Pages, String> {
        // The device is told physical addresses: the kernel must not move these pages
        // (compaction migrates mlocked pages unless told not to), or the device would
        // read and discard whatever took their place.
        fs::write("/proc/sys/vm/compact_unevictable_allowed", "0")
            .map_err(|e| format!("pinning mlocked pages (compact_unevictable_allowed): {e}"))?;
        let len = count * PAGE;
        // SAFETY: a fresh anonymous mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: locking our own mapping so its physical pages stay put.
        if unsafe { libc::mlock(ptr, len) } != 0 {
            return Err(format!("mlock: {}", std::io::Error::last_os_error()));
        }
        let phys = physical_addresses(ptr as usize, count)?;
        Ok(Pages {
            ptr: ptr.cast(),
            len,
            phys,
        })
    }

    /// True when a page is no longer where the device was told it is.
    fn moved(&self) -> bool {
        physical_addresses(self.ptr as usize, self.phys.len()).map_or(true, |now| now != self.phys)
    }

    fn page(&self, i: usize) -> *mut u8 {
        assert!(i * PAGE < self.len);
        // SAFETY: inside our mapping.
        unsafe { self.ptr.add(i * PAGE) }
    }

    fn write<T: Copy>(&self, page: usize, offset: usize, value: T) {
        assert!(offset + std::mem::size_of::<T>() <= PAGE);
        // SAFETY: inside page `page` of our mapping; volatile because the device reads it.
        unsafe { std::ptr::write_volatile(self.page(page).add(offset).cast::<T>(), value) }
    }

    fn read<T: Copy>(&self, page: usize, offset: usize) -> T {
        assert!(offset + std::mem::size_of::<T>() <= PAGE);
        // SAFETY: as for write; the device writes the used ring.
        unsafe { std::ptr::read_volatile(self.page(page).add(offset).cast::<T>()) }
    }
}

/// The guest-physical addresses of `count` pages from `virt`, from /proc/self/pagemap.
fn physical_addresses(virt: usize, count: usize) -> Result<Vec<u64>, String> {
    let pagemap = fs::File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    let mut phys = Vec::with_capacity(count);
    for i in 0..count {
        let mut entry = [0u8; 8];
        let offset = ((virt + i * PAGE) / PAGE * 8) as i64;
        // SAFETY: reading 8 bytes into our buffer at an offset of the pagemap file.
        let n = unsafe { libc::pread(pagemap.as_raw_fd(), entry.as_mut_ptr().cast(), 8, offset) };
        let entry = u64::from_le_bytes(entry);
        if n != 8 || entry & (1 << 63) == 0 || entry & ((1 << 55) - 1) == 0 {
            return Err("pagemap gave no physical page (not root?)".into());
        }
        phys.push((entry & ((1 << 55) - 1)) * PAGE as u64);
    }
    Ok(phys)
}

/// The device's register window mapped from /dev/mem.
struct Regs {
    ptr: *mut u8,
}

impl Regs {
    fn map(phys: u64) -> Result<Regs, String> {
        let mem = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/mem")
            .map_err(|e| format!("/dev/mem: {e}"))?;
        // SAFETY: mapping the device's 4 KiB register window; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                phys as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "mmap of /dev/mem at {phys:#x}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Regs { ptr: ptr.cast() })
    }

    fn write(&self, offset: usize, value: u32) {
        // SAFETY: a 32-bit register inside the mapped window.
        unsafe { std::ptr::write_volatile(self.ptr.add(offset).cast::<u32>(), value) }
    }

    fn read(&self, offset: usize) -> u32 {
        // SAFETY: as for write.
        unsafe { std::ptr::read_volatile(self.ptr.add(offset).cast::<u32>()) }
    }
}

/// The balloon's platform device name (e.g. `LNRO0005:01`) and its mapped registers:
/// every virtio-mmio window in /proc/iomem is mapped and asked for its device ID, so the
/// balloon is found again after an earlier run unbound it from Linux.
fn find_device() -> Result<(String, Regs), String> {
    let iomem = fs::read_to_string("/proc/iomem").map_err(|e| e.to_string())?;
    for line in iomem.lines() {
        let Some((range, name)) = line.trim().split_once(" : ") else {
            continue;
        };
        let name = name.trim();
        if !name.starts_with("LNRO0005:") {
            continue;
        }
        let start = range.split('-').next().unwrap_or("");
        let start = u64::from_str_radix(start, 16).map_err(|e| e.to_string())?;
        // Unbound first: Linux keeps a bound device's window to itself.
        let bound = format!("/sys/bus/platform/devices/{name}/driver");
        if fs::metadata(&bound).is_ok() {
            // With IO_STRICT_DEVMEM a bound window cannot be mapped: then unbind to look.
            let balloon = Regs::map(start)
                .map(|r| r.read(0) == 0x7472_6976 && r.read(8) == 5)
                .unwrap_or(true);
            if !balloon {
                continue;
            }
            fs::write("/sys/bus/platform/drivers/virtio-mmio/unbind", name)
                .map_err(|e| format!("unbinding {name}: {e}"))?;
        }
        let regs = Regs::map(start)?;
        if regs.read(0) == 0x7472_6976 && regs.read(8) == 5 {
            return Ok((name.to_string(), regs));
        }
    }
    Err("no virtio balloon in /proc/iomem".into())
}

impl Drop for Regs {
    fn drop(&mut self) {
        // SAFETY: unmapping the window this value mapped.
        unsafe { libc::munmap(self.ptr.cast(), PAGE) };
    }
}

/// A small xorshift generator for the malformed mode.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Runs the flood for `secs` seconds.
pub fn run(mode: Mode, secs: f64) -> Result<Outcome, String> {
    // Take the device from Linux: unbinding virtio-mmio resets it and frees its window.
    let (_platform, regs) = find_device()?;

    // Pages: 0 desc table, 1 avail, 2 used, 3 stats buffer, 4..20 PFN arrays,
    // 20..84 victim (64 pages), 84..100 bystander, 100..112 the other queues' rings.
    let pages = Pages::new(112)?;
    const IDLE_RINGS: usize = 100;
    const PFN_ARRAYS: usize = 4;
    const VICTIM: usize = 20;
    const VICTIM_PAGES: usize = 64;
    const BYSTANDER: usize = 84;
    const BYSTANDER_PAGES: usize = 16;
    for p in BYSTANDER..BYSTANDER + BYSTANDER_PAGES {
        for off in (0..PAGE).step_by(8) {
            pages.write::<u64>(p, off, 0xeb0b_0000_0000_0000 | (p * PAGE + off) as u64);
        }
    }

    // Handshake.
    regs.write(STATUS, 0);
    regs.write(STATUS, 1 | 2);
    regs.write(DEVICE_FEATURES_SEL, 0);
    let offered = u64::from(regs.read(DEVICE_FEATURES));
    regs.write(DEVICE_FEATURES_SEL, 1);
    let offered = offered | (u64::from(regs.read(DEVICE_FEATURES)) << 32);
    let wanted = F_VERSION_1 | (offered & (F_STATS_VQ | F_PAGE_REPORTING));
    regs.write(DRIVER_FEATURES_SEL, 0);
    regs.write(DRIVER_FEATURES, wanted as u32);
    regs.write(DRIVER_FEATURES_SEL, 1);
    regs.write(DRIVER_FEATURES, (wanted >> 32) as u32);
    regs.write(STATUS, 1 | 2 | 8);
    if regs.read(STATUS) & 8 == 0 {
        return Err("the device refused the features".into());
    }
    let stats = wanted & F_STATS_VQ != 0;
    let queue = match mode {
        Mode::Inflate | Mode::Malformed => 0,
        Mode::Stats if stats => 2,
        Mode::Stats => return Err("no statistics queue offered".into()),
        Mode::Report if wanted & F_PAGE_REPORTING != 0 => 2 + u32::from(stats),
        Mode::Report => return Err("no reporting queue offered".into()),
    };
    // Every queue the features imply must be set up, or the device refuses to start;
    // the flooded one gets pages 0-2, the others idle rings of their own.
    let queues = 2 + u32::from(stats) + u32::from(wanted & F_PAGE_REPORTING != 0);
    let mut size = 0;
    for q in 0..queues {
        regs.write(QUEUE_SEL, q);
        let q_size = (regs.read(QUEUE_NUM_MAX) as u16).min(QUEUE_SIZE);
        if q_size == 0 {
            return Err(format!("queue {q} does not exist"));
        }
        let first = if q == queue {
            0
        } else {
            IDLE_RINGS + 3 * q as usize
        };
        regs.write(QUEUE_NUM, u32::from(q_size));
        for (reg, page) in [
            (QUEUE_DESC, first),
            (QUEUE_AVAIL, first + 1),
            (QUEUE_USED, first + 2),
        ] {
            regs.write(reg, pages.phys[page] as u32);
            regs.write(reg + 4, (pages.phys[page] >> 32) as u32);
        }
        regs.write(QUEUE_READY, 1);
        if q == queue {
            size = q_size;
        }
    }
    regs.write(STATUS, 1 | 2 | 8 | 4);

    // Descriptors.
    let desc = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
        let off = usize::from(i) * 16;
        pages.write::<u64>(0, off, addr);
        pages.write::<u32>(0, off + 8, len);
        pages.write::<u16>(0, off + 12, flags);
        pages.write::<u16>(0, off + 14, next);
    };
    match mode {
        Mode::Inflate => {
            // 16 arrays of 1,024 PFNs, all naming victim pages.
            for a in 0..16usize {
                let array = PFN_ARRAYS + a;
                for k in 0..PAGE / 4 {
                    let victim = VICTIM + (a * 1024 + k) % VICTIM_PAGES;
                    pages.write::<u32>(array, k * 4, (pages.phys[victim] / PAGE as u64) as u32);
                }
                let last = a == 15;
                let flags = if last { 0 } else { DESC_F_NEXT };
                desc(
                    a as u16,
                    pages.phys[array],
                    PAGE as u32,
                    flags,
                    a as u16 + 1,
                );
            }
        }
        Mode::Report => {
            for a in 0..16u16 {
                let flags = DESC_F_WRITE | if a == 15 { 0 } else { DESC_F_NEXT };
                desc(
                    a,
                    pages.phys[VICTIM + usize::from(a)],
                    PAGE as u32,
                    flags,
                    a + 1,
                );
            }
        }
        Mode::Stats => desc(0, pages.phys[3], 64, 0, 0),
        Mode::Malformed => {}
    }

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let used_idx = || pages.read::<u16>(2, 2);
    let first_used = used_idx();
    let mut completed: u64 = 0;
    let mut last_used = first_used;
    let mut avail: u16 = 0;
    let mut kicks = 0u64;
    let mut last_kick = Instant::now();
    while Instant::now() < deadline {
        if mode == Mode::Malformed {
            for i in 0..size {
                let r = rng.next();
                let addr = match r % 4 {
                    0 => rng.next(),
                    1 => pages.phys[VICTIM + (r as usize >> 8) % VICTIM_PAGES],
                    2 => u64::MAX - 4095,
                    // Far above any test guest's RAM: a PFN array read from the guest's
                    // own kernel memory would make the host discard random pages of it.
                    _ => (1 << 40) + ((rng.next() % (1 << 30)) & !4095),
                };
                let len = match (r >> 2) % 4 {
                    0 => 0,
                    1 => u32::MAX,
                    2 => PAGE as u32,
                    _ => rng.next() as u32,
                };
                let flags = (rng.next() as u16) & (DESC_F_NEXT | DESC_F_WRITE | DESC_F_INDIRECT);
                desc(i, addr, len, flags, (rng.next() as u16) % (size + 2));
            }
        }
        // Keep the ring full: every free slot names head 0 (or a random head).
        let used = used_idx();
        completed += u64::from(used.wrapping_sub(last_used));
        last_used = used;
        let before = avail;
        while avail.wrapping_sub(used) < size {
            let head = if mode == Mode::Malformed {
                (rng.next() as u16) % (size + 4)
            } else {
                0
            };
            pages.write::<u16>(1, 4 + 2 * usize::from(avail % size), head);
            avail = avail.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        pages.write::<u16>(1, 2, avail);
        // Kick whenever the ring gained entries, and at least every millisecond while it
        // is full. A kick is an eventfd signal to Ebb however often the guest writes it
        // (ioeventfd coalesces them); kicking in a tight loop only loads the emulated test
        // host's instruction emulation (~16,000 MMIO exits a second), the likeliest
        // trigger of the crashes CI's test hosts showed during this flood (not seen here).
        if avail != before || last_kick.elapsed() >= KICK_INTERVAL {
            regs.write(QUEUE_NOTIFY, queue);
            kicks += 1;
            last_kick = Instant::now();
        }
        std::thread::yield_now();
    }
    let used = used_idx();
    completed += u64::from(used.wrapping_sub(last_used));
    let final_status = regs.read(STATUS);
    regs.write(STATUS, 0);
    let mut intact = true;
    for p in BYSTANDER..BYSTANDER + BYSTANDER_PAGES {
        for off in (0..PAGE).step_by(8) {
            if pages.read::<u64>(p, off) != 0xeb0b_0000_0000_0000 | (p * PAGE + off) as u64 {
                intact = false;
            }
        }
    }
    Ok(Outcome {
        mode: mode.name().into(),
        secs: start.elapsed().as_secs_f64(),
        completed,
        kicks,
        final_status,
        bystander_intact: intact,
        pages_moved: pages.moved(),
    })
}
