//! The virtio-blk device driven through a mock virtqueue in real guest memory, as a guest
//! driver would, against real image files: no VM, real `preadv`, `fdatasync`,
//! `fallocate`.

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use ebb_block::counters::BlockCounters;
use ebb_block::counters::{Op, Reject};
use ebb_block::protocol::{config, features, request_type as t, status, QUEUE_SIZE};
use ebb_block::queue::{Disk, RequestQueue, Slot, CACHED_PASS_BYTES, MAX_IN_FLIGHT};
use ebb_block::request::DiskShape;
use ebb_block::{open_images, Block, IoOptions};
use ebb_devices::ram::{GuestRam, RamOptions};
use ebb_devices::virtio::{
    Activation, ActiveQueue, InterruptKind, QueueWork, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
/// Guest RAM: region A [0, 32 MiB), a hole, region B [64 MiB, 72 MiB).
const A_END: u64 = 32 * MIB;
const B_START: u64 = 64 * MIB;
const B_END: u64 = 72 * MIB;
/// Where the queue lives.
const QUEUE_AT: u64 = 0x1_0000;
/// Request headers, 16 bytes each.
const HEADERS: u64 = MIB;
/// Status bytes, one each.
const STATUSES: u64 = 2 * MIB;
/// Data buffers.
const DATA: u64 = 4 * MIB;
/// Discard/write-zeroes segments.
const SEGMENTS: u64 = 3 * MIB;

fn ram() -> GuestRam {
    GuestRam::new(
        &[
            (GuestAddress(0), A_END),
            (GuestAddress(B_START), B_END - B_START),
        ],
        RamOptions::default(),
    )
    .unwrap()
}

/// A scratch directory for images, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ebb-block-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// An image of `len` bytes filled with `fill` (allocated on disk).
    fn image(&self, name: &str, len: u64, fill: u8) -> PathBuf {
        let p = self.0.join(name);
        let f = File::create(&p).unwrap();
        let chunk = vec![fill; MIB as usize];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(MIB);
            f.write_all_at(&chunk[..n as usize], at).unwrap();
            at += n;
        }
        f.sync_all().unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Irq {
    queue: AtomicU32,
}

impl VirtioInterrupt for Irq {
    fn trigger(&self, kind: InterruptKind) {
        if kind == InterruptKind::Queue {
            self.queue.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// One buffer of a chain: (guest address, length, device-writable).
type Buf = (u64, u32, bool);

/// The driver's side of the request queue.
struct Driver<'a> {
    mem: &'a GuestMemoryMmap,
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    requests: u64,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a GuestMemoryMmap) -> Self {
        Self {
            mem,
            mock: MockSplitQueue::create(mem, GuestAddress(QUEUE_AT), QUEUE_SIZE),
            next_desc: 0,
            requests: 0,
        }
    }

    fn queue(&self) -> Queue {
        self.mock.create_queue::<Queue>().unwrap()
    }

    /// Adds a chain of raw descriptors.
    fn chain(&mut self, bufs: &[Buf], extra_flags: u16) {
        let start = self.next_desc;
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = extra_flags;
                if write {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                let next = if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                    (start + i as u16 + 1) % QUEUE_SIZE
                } else {
                    0
                };
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&descs, start).unwrap();
        self.next_desc = (start + bufs.len() as u16) % QUEUE_SIZE;
        self.requests += 1;
    }

    /// Adds a request: header (type, sector), data buffers, a status byte. Returns where
    /// the status goes.
    fn request(&mut self, kind: u32, sector: u64, data: &[Buf]) -> u64 {
        let n = self.requests;
        let header = HEADERS + n * 16;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(header)).unwrap();
        let status_at = STATUSES + n;
        self.mem.write_obj(0xffu8, GuestAddress(status_at)).unwrap();
        let mut bufs = vec![(header, 16, false)];
        bufs.extend_from_slice(data);
        bufs.push((status_at, 1, true));
        self.chain(&bufs, 0);
        status_at
    }

    /// A discard or write-zeroes request with `segments` (sector, sectors, flags).
    fn ranges(&mut self, kind: u32, segments: &[(u64, u32, u32)]) -> u64 {
        let at = SEGMENTS + self.requests * 512;
        for (i, &(sector, sectors, flags)) in segments.iter().enumerate() {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&sectors.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            self.mem
                .write_slice(&s, GuestAddress(at + i as u64 * 16))
                .unwrap();
        }
        self.request(kind, 0, &[(at, segments.len() as u32 * 16, false)])
    }

    fn status(&self, at: u64) -> u8 {
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    fn used_count(&self) -> u16 {
        self.mock.used().idx().load()
    }

    /// The head of the `i`th returned chain.
    fn used_id(&self, i: u16) -> u32 {
        self.mock
            .used()
            .ring()
            .ref_at(i as usize)
            .unwrap()
            .load()
            .id()
    }

    /// The used length of the `i`th returned chain.
    fn used_len(&self, i: u16) -> u32 {
        self.mock
            .used()
            .ring()
            .ref_at(i as usize)
            .unwrap()
            .load()
            .len()
    }

    fn fill(&self, at: u64, len: usize, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len], GuestAddress(at))
            .unwrap();
    }

    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    }
}

/// A disk over `path`, activated with everything it offers.
fn disk(
    path: &Path,
    readonly: bool,
    id: &str,
    ram: &GuestRam,
    driver: &Driver,
) -> (Block, Arc<Irq>) {
    let image = open_images(&[(path.to_path_buf(), readonly)])
        .unwrap()
        .pop()
        .unwrap();
    let mut block = Block::new(image, id, &IoOptions::default()).unwrap();
    let offered = block.features();
    let irq = activate(&mut block, ram, offered, driver);
    (block, irq)
}

fn activate(block: &mut Block, ram: &GuestRam, features: u64, driver: &Driver) -> Arc<Irq> {
    let irq = Arc::new(Irq::default());
    block
        .activate(Activation {
            ram: ram.clone(),
            features,
            queues: vec![ActiveQueue {
                index: 0,
                queue: driver.queue(),
            }],
            interrupt: irq.clone(),
        })
        .unwrap();
    irq
}

fn file_bytes(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap()
}

fn blocks(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks()
}

#[test]
fn features_and_configuration_space() {
    let s = Scratch::new();
    let p = s.image("d.img", 4 * MIB, 0);
    let ram = ram();
    let driver = Driver::new(ram.memory());
    let (mut rw, _) = disk(&p, false, "rw", &ram, &driver);
    assert_eq!(rw.device_type(), 2);
    let f = rw.features();
    for bit in [
        VIRTIO_F_VERSION_1,
        features::FLUSH,
        features::SEG_MAX,
        features::SIZE_MAX,
        features::BLK_SIZE,
        features::DISCARD,
        features::WRITE_ZEROES,
        features::EVENT_IDX,
    ] {
        assert_ne!(f & bit, 0, "{bit:#x}");
    }
    assert_eq!(f & features::RO, 0);
    assert_eq!(rw.queue_max_sizes(), [QUEUE_SIZE]);
    let mut cap = [0u8; 8];
    rw.read_config(0, &mut cap);
    assert_eq!(
        u64::from_le_bytes(cap),
        8192,
        "capacity in 512-byte sectors"
    );
    let mut b = [0u8; 1];
    rw.read_config(config::WRITE_ZEROES_MAY_UNMAP as u64, &mut b);
    assert_eq!(b, [1]);
    let mut past = [0xffu8; 4];
    rw.read_config(config::LEN as u64 - 2, &mut past);
    assert_eq!(past, [0; 4], "reads past the end are zero");
    rw.read_config(u64::MAX, &mut past);
    assert_eq!(past, [0; 4]);
    rw.write_config(0, &[1, 2, 3, 4]);
    assert_eq!(rw.rejected_config_writes(), 1);
    rw.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8192, "not writable");
    drop(rw);

    let (ro, _) = disk(&p, true, "ro", &ram, &driver);
    let f = ro.features();
    assert_ne!(f & features::RO, 0);
    assert_eq!(f & (features::DISCARD | features::WRITE_ZEROES), 0);
    assert!(ro.readonly());
    assert_eq!(ro.capacity(), 4 * MIB);
}

#[test]
fn write_then_read_round_trip_in_place() {
    let s = Scratch::new();
    let p = s.image("d.img", 4 * MIB, 0);
    let ram = ram();
    let mut d = Driver::new(ram.memory());
    let (mut block, irq) = disk(&p, false, "d", &ram, &d);
    // Two buffers, one in each region: 4 KiB and 512 bytes, written at sector 10.
    d.fill(DATA, 4096, 0xab);
    d.fill(B_START + 100, 512, 0xcd);
    let w = d.request(
        t::OUT,
        10,
        &[(DATA, 4096, false), (B_START + 100, 512, false)],
    );
    // Requests in flight complete in any order (virtio-blk promises none): the read goes
    // in once the write is done, as a guest would wait for it.
    block.settle();
    // Read them back into other buffers.
    let r = d.request(
        t::IN,
        10,
        &[(DATA + MIB, 2048, true), (B_START + MIB + 1, 2560, true)],
    );
    block.settle();
    assert_eq!((d.status(w), d.status(r)), (status::OK, status::OK));
    assert_eq!(d.used_count(), 2);
    assert_eq!(d.used_len(0), 1, "a write only writes its status");
    assert_eq!(d.used_len(1), 4608 + 1, "a read writes its data and status");
    let irqs = irq.queue.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&irqs),
        "at most one interrupt per pass: {irqs}"
    );
    let back = [d.read(DATA + MIB, 2048), d.read(B_START + MIB + 1, 2560)].concat();
    let mut expected = vec![0xab; 4096];
    expected.extend(vec![0xcd; 512]);
    assert_eq!(back, expected);
    let f = file_bytes(&p);
    assert_eq!(&f[5120..5120 + 4608], &expected[..]);
    assert!(f[..5120].iter().all(|b| *b == 0));
    assert!(f[5120 + 4608..].iter().all(|b| *b == 0));
    let c = block.counters();
    assert_eq!((c.completed(Op::Write), c.completed(Op::Read)), (1, 1));
    assert_eq!((c.written_bytes, c.read_bytes), (4608, 4608));
    assert_eq!(c.rejected_total(), 0);
    // Reads of the last sector work; reads reach into what the host wrote.
    File::options()
        .write(true)
        .open(&p)
        .unwrap()
        .write_all_at(&[0x5a; 512], 4 * MIB - 512)
        .unwrap();
    let r = d.request(t::IN, 4 * MIB / 512 - 1, &[(DATA, 512, true)]);
    block.settle();
    assert_eq!(d.status(r), status::OK);
    assert_eq!(d.read(DATA, 512), vec![0x5a; 512]);
}

#[test]
fn flush_and_get_id() {
    let s = Scratch::new();
    let p = s.image("d.img", MIB, 0);
    let ram = ram();
    let mut d = Driver::new(ram.memory());
    let (mut block, _) = disk(&p, false, "root-disk", &ram, &d);
    let f = d.request(t::FLUSH, 0, &[]);
    d.fill(DATA, 32, 0xee);
    let id = d.request(t::GET_ID, 0, &[(DATA, 20, true)]);
    // A short buffer gets the start of the ID; two buffers get it across both.
    d.fill(DATA + 64, 32, 0xee);
    let short = d.request(t::GET_ID, 0, &[(DATA + 64, 4, true)]);
    d.fill(DATA + 128, 32, 0xee);
    let split = d.request(
        t::GET_ID,
        0,
        &[(DATA + 128, 3, true), (DATA + 160, 30, true)],
    );
    block.settle();
    for at in [f, id, short, split] {
        assert_eq!(d.status(at), status::OK);
    }
    let mut expected = b"root-disk".to_vec();
    expected.resize(20, 0);
    assert_eq!(d.read(DATA, 20), expected);
    assert_eq!(d.read(DATA + 20, 1), [0xee], "nothing past the 20 bytes");
    assert_eq!(d.read(DATA + 64, 5), [b'r', b'o', b'o', b't', 0xee]);
    assert_eq!(d.read(DATA + 128, 3), b"roo");
    assert_eq!(&d.read(DATA + 160, 17)[..6], b"t-disk");
    // GET_ID is answered on the spot, before the flush comes back from the I/O threads.
    assert_eq!(d.used_len(0), 21);
    assert_eq!(d.used_len(1), 5);
    assert_eq!(d.used_len(3), 1, "the flush, last");
    let c = block.counters();
    assert_eq!((c.completed(Op::Flush), c.completed(Op::GetId)), (1, 3));
    // A 20-byte ID fills the buffer without a NUL.
    let (mut full, _) = disk(
        &s.image("e.img", MIB, 0),
        false,
        "abcdefghijklmnopqrst",
        &ram,
        &d,
    );
    let id = d.request(t::GET_ID, 0, &[(DATA, 20, true)]);
    full.settle();
    assert_eq!(d.status(id), status::OK);
    assert_eq!(d.read(DATA, 20), b"abcdefghijklmnopqrst");
}

#[test]
fn discard_punches_holes() {
    let s = Scratch::new();
    let p = s.image("d.img", 8 * MIB, 0x77);
    let before = blocks(&p);
    assert!(before >= 8 * MIB / 512, "allocated: {before} blocks");
    let ram = ram();
    let mut d = Driver::new(ram.memory());
    let (mut block, _) = disk(&p, false, "d", &ram, &d);
    // 2 MiB from 1 MiB, and 1 MiB from 6 MiB, in one request.
    let at = d.ranges(t::DISCARD, &[(2048, 4096, 0), (12288, 2048, 0)]);
    block.settle();
    assert_eq!(d.status(at), status::OK);
    let after = blocks(&p);
    assert!(
        after <= before - 3 * MIB / 512,
        "3 MiB deallocated: {before} -> {after} blocks"
    );
    let f = file_bytes(&p);
    assert_eq!(f.len() as u64, 8 * MIB, "the size is kept");
    assert!(f[MIB as usize..3 * MIB as usize].iter().all(|b| *b == 0));
    assert!(f[6 * MIB as usize..7 * MIB as usize]
        .iter()
        .all(|b| *b == 0));
    assert!(f[..MIB as usize].iter().all(|b| *b == 0x77));
    assert!(f[3 * MIB as usize..6 * MIB as usize]
        .iter()
        .all(|b| *b == 0x77));
    assert!(f[7 * MIB as usize..].iter().all(|b| *b == 0x77));
    let c = block.counters();
    assert_eq!((c.completed(Op::Discard), c.discarded_bytes), (1, 3 * MIB));
}

#[test]
fn write_zeroes_with_and_without_unmap() {
    let s = Scratch::new();
    let p = s.image("d.img", 8 * MIB, 0x33);
    let ram = ram();
    let mut d = Driver::new(ram.memory());
    let (mut block, _) = disk(&p, false, "d", &ram, &d);
    let before = blocks(&p);
    let keep = d.ranges(t::WRITE_ZEROES, &[(0, 2048, 0)]);
    block.settle();
    assert_eq!(d.status(keep), status::OK);
    let f = file_bytes(&p);
    assert!(f[..MIB as usize].iter().all(|b| *b == 0));
    assert!(f[MIB as usize..].iter().all(|b| *b == 0x33));
    let middle = blocks(&p);
    let unmap = d.ranges(t::WRITE_ZEROES, &[(4096, 4096, 1)]);
    block.settle();
    assert_eq!(d.status(unmap), status::OK);
    let f = file_bytes(&p);
    assert!(f[2 * MIB as usize..4 * MIB as usize]
        .iter()
        .all(|b| *b == 0));
    assert!(f[4 * MIB as usize..].iter().all(|b| *b == 0x33));
    let after = blocks(&p);
    assert!(
        after <= middle - 2 * MIB / 512,
        "unmap punched: {middle} -> {after}"
    );
    assert!(middle <= before, "zero range never allocates more");
    let c = block.counters();
    assert_eq!((c.completed(Op::WriteZeroes), c.zeroed_bytes), (2, 3 * MIB));
}

#[test]
fn read_only_disks_refuse_every_write() {
    let s = Scratch::new();
    let p = s.image("d.img", MIB, 0x11);
    let ram = ram();
    let mut d = Driver::new(ram.memory());
    let (mut block, _) = disk(&p, true, "d", &ram, &d);
    d.fill(DATA, 512, 0x99);
    let w = d.request(t::OUT, 0, &[(DATA, 512, false)]);
    // Discard and write-zeroes were not offered: unsupported, whatever the flags.
    let dis = d.ranges(t::DISCARD, &[(0, 8, 0)]);
    let wz = d.ranges(t::WRITE_ZEROES, &[(0, 8, 0)]);
    let r = d.request(t::IN, 0, &[(DATA + 4096, 512, true)]);
    let fl = d.request(t::FLUSH, 0, &[]);
    block.settle();
    assert_eq!(d.status(w), status::IOERR);
    assert_eq!(
        (d.status(dis), d.status(wz)),
        (status::UNSUPP, status::UNSUPP)
    );
    assert_eq!((d.status(r), d.status(fl)), (status::OK, status::OK));
    assert_eq!(d.read(DATA + 4096, 512), vec![0x11; 512]);
    assert_eq!(file_bytes(&p), vec![0x11; MIB as usize]);
    let c = block.counters();
    assert_eq!(c.rejected(Reject::ReadOnly), 1);
    assert_eq!(c.rejected(Reject::Unsupported), 2);
    // Even if a driver accepted features it was not offered, a read-only disk writes
    // nothing (the transport refuses such drivers; this is the device's own check).
    let mut d2 = Driver::new(ram.memory());
    let image = open_images(&[(p.clone(), true)]).unwrap().pop().unwrap();
    let mut forced = Block::new(image, "x", &IoOptions::default()).unwrap();
    activate(
        &mut forced,
        &ram,
        VIRTIO_F_VERSION_1 | features::DISCARD,
        &d2,
    );
    let dis = d2.ranges(t::DISCARD, &[(0, 8, 0)]);
    forced.settle();
    assert_eq!(d2.status(dis), status::IOERR);
    assert_eq!(file_bytes(&p), vec![0x11; MIB as usize]);
}

/// Every hostile request gets its status and is counted by kind; the image and guest
/// memory outside the request's own buffers are untouched.
#[test]
fn hostile_requests_touch_nothing_outside_the_image() {
    let s = Scratch::new();
    let size = MIB;
    let p = s.image("d.img", size, 0x42);
    let ram = ram();
    let mut d = Driver::new(ram.memory());
    let (mut block, _) = disk(&p, false, "d", &ram, &d);
    let last = size / 512;
    d.fill(DATA, 8192, 0x66);
    let cases: Vec<(&str, u64, u8, Reject)> = vec![
        (
            "write past the end",
            d.request(t::OUT, last, &[(DATA, 512, false)]),
            status::IOERR,
            Reject::Range,
        ),
        (
            "write across the end",
            d.request(t::OUT, last - 1, &[(DATA, 1024, false)]),
            status::IOERR,
            Reject::Range,
        ),
        (
            "read past the end",
            d.request(t::IN, last, &[(DATA, 512, true)]),
            status::IOERR,
            Reject::Range,
        ),
        (
            "sector * 512 overflows",
            d.request(t::OUT, u64::MAX / 2, &[(DATA, 512, false)]),
            status::IOERR,
            Reject::Range,
        ),
        (
            "offset + len wraps to 0",
            d.request(t::OUT, (u64::MAX >> 9) - 1, &[(DATA, 2048, false)]),
            status::IOERR,
            Reject::Range,
        ),
        (
            "write from a writable buffer",
            d.request(t::OUT, 0, &[(DATA, 512, true)]),
            status::IOERR,
            Reject::Direction,
        ),
        (
            "read into a readable buffer",
            d.request(t::IN, 0, &[(DATA, 512, false)]),
            status::IOERR,
            Reject::Direction,
        ),
        (
            "empty write",
            d.request(t::OUT, 0, &[]),
            status::IOERR,
            Reject::Length,
        ),
        (
            "half a sector",
            d.request(t::OUT, 0, &[(DATA, 256, false)]),
            status::IOERR,
            Reject::Length,
        ),
        (
            "buffer in the hole",
            d.request(t::IN, 0, &[(A_END, 512, true)]),
            status::IOERR,
            Reject::Buffer,
        ),
        (
            "buffer across the hole",
            d.request(t::IN, 0, &[(A_END - 256, 512, true)]),
            status::IOERR,
            Reject::Buffer,
        ),
        (
            "buffer past RAM",
            d.request(t::IN, 0, &[(B_END, 512, true)]),
            status::IOERR,
            Reject::Buffer,
        ),
        (
            "buffer at the top of the address space",
            d.request(t::IN, 0, &[(u64::MAX - 255, 512, true)]),
            status::IOERR,
            Reject::Buffer,
        ),
        (
            "oversized buffer",
            d.request(t::IN, 0, &[(DATA, 128 << 10, true)]),
            status::IOERR,
            Reject::Buffer,
        ),
        (
            "unknown type",
            d.request(0x1234, 0, &[(DATA, 512, false)]),
            status::UNSUPP,
            Reject::Unsupported,
        ),
        (
            "discard flags",
            d.ranges(t::DISCARD, &[(0, 8, 1)]),
            status::UNSUPP,
            Reject::Segment,
        ),
        (
            "discard past the end",
            d.ranges(t::DISCARD, &[(0, 8, 0), (last, 8, 0)]),
            status::IOERR,
            Reject::Range,
        ),
        (
            "write zeroes past the end",
            d.ranges(t::WRITE_ZEROES, &[(last - 4, 8, 1)]),
            status::IOERR,
            Reject::Range,
        ),
    ];
    // A chain with the status in the wrong place: nothing written, used length 0.
    let before_no_status = d.requests;
    d.chain(&[(HEADERS, 16, false), (DATA, 512, true)], 0);
    let n = cases.len() as u64;
    // Refused requests are answered on the spot, without the I/O threads.
    assert_eq!(block.process_queue(0), QueueWork::Done);
    assert_eq!(u64::from(d.used_count()), n + 1);
    for (what, at, status, _) in &cases {
        assert_eq!(d.status(*at), *status, "{what}");
    }
    assert_eq!(d.used_len(before_no_status as u16), 0);
    let c = block.counters();
    for reason in Reject::ALL {
        let expected = cases.iter().filter(|c| c.3 == reason).count() as u64
            + u64::from(reason == Reject::NoStatus);
        assert_eq!(c.rejected(reason), expected, "{}", reason.name());
    }
    assert_eq!(c.completed(Op::Write) + c.completed(Op::Read), 0);
    assert_eq!(
        file_bytes(&p),
        vec![0x42; size as usize],
        "the image is unchanged"
    );
    assert_eq!(fs::metadata(&p).unwrap().len(), size);
    assert_eq!(
        d.read(DATA, 8192),
        vec![0x66; 8192],
        "guest buffers unchanged"
    );
}

#[test]
fn indirect_tables_and_resets() {
    let s = Scratch::new();
    let p = s.image("d.img", MIB, 0);
    let ram = ram();
    let mut d = Driver::new(ram.memory());
    let (mut block, _) = disk(&p, false, "d", &ram, &d);
    // A chain through an indirect table (never offered): given back unread.
    d.chain(&[(DATA, 32, false)], VRING_DESC_F_INDIRECT as u16);
    block.settle();
    assert_eq!(d.used_count(), 1);
    assert_eq!(d.used_len(0), 0);
    assert_eq!(block.counters().rejected(Reject::Chain), 1);
    // After a reset nothing is processed until the next activation.
    block.reset();
    let r = d.request(t::IN, 0, &[(DATA, 512, true)]);
    assert_eq!(block.process_queue(0), QueueWork::Done);
    assert_eq!(d.status(r), 0xff, "untouched");
    assert_eq!(block.process_queue(1), QueueWork::Done, "no such queue");
    let err = block.activate(Activation {
        ram: ram.clone(),
        features: VIRTIO_F_VERSION_1,
        queues: vec![],
        interrupt: Arc::new(Irq::default()),
    });
    assert!(err.is_err(), "no request queue");
}

/// Requests on the I/O threads for real, many at once: all answered, data in place.
#[test]
fn many_requests_through_the_io_threads() {
    let s = Scratch::new();
    let p = s.image("d.img", 16 * MIB, 0);
    let ram = ram();
    let mut d = Driver::new(ram.memory());
    let (mut block, _) = disk(&p, false, "d", &ram, &d);
    // 80 writes of 4 KiB, each its own pattern, then 80 reads of them back.
    let mut statuses = Vec::new();
    for i in 0..80u64 {
        d.fill(DATA + i * 4096, 4096, i as u8 + 1);
        statuses.push(d.request(t::OUT, i * 8, &[(DATA + i * 4096, 4096, false)]));
    }
    block.settle();
    let mut d = Driver::new(ram.memory());
    let (mut block, _) = {
        drop(block);
        disk(&p, false, "d", &ram, &d)
    };
    for i in 0..80u64 {
        statuses.push(d.request(t::IN, i * 8, &[(DATA + MIB + i * 4096, 4096, true)]));
    }
    block.settle();
    assert!(statuses.iter().all(|at| d.status(*at) == status::OK));
    for i in 0..80u64 {
        assert_eq!(d.read(DATA + MIB + i * 4096, 4096), vec![i as u8 + 1; 4096]);
    }
    assert_eq!(block.counters().read_bytes, 80 * 4096);
}

/// The event loop's side of a queue over `file`, driven by hand: the test plays the I/O
/// threads, which get every request (the loop answers no read from the page cache)
/// unless the test turns cached reads on.
struct ByHand<'a> {
    rq: RequestQueue,
    ram: &'a GuestRam,
    disk: Disk,
    file: File,
    irq: Irq,
    counters: BlockCounters,
    out: Vec<Slot>,
}

impl<'a> ByHand<'a> {
    fn new(ram: &'a GuestRam, driver: &Driver, size: u64, file: &File) -> Self {
        let mut rq = RequestQueue::new(driver.queue(), ram, 1);
        rq.set_cached_reads(false);
        Self {
            rq,
            ram,
            disk: Disk {
                shape: DiskShape {
                    size,
                    readonly: false,
                    negotiated: VIRTIO_F_VERSION_1 | features::FLUSH,
                },
                id: [0; 20],
            },
            file: file.try_clone().unwrap(),
            irq: Irq::default(),
            counters: BlockCounters::default(),
            out: Vec::new(),
        }
    }

    fn process(&mut self) -> QueueWork {
        let out = &mut self.out;
        self.rq
            .process(
                self.ram,
                &self.disk,
                &self.file,
                &self.irq,
                &mut self.counters,
                &mut |slot| out.push(slot),
            )
            .work
    }

    /// Runs the handed-out request `i` against `file` and completes it.
    fn finish(&mut self, i: usize, file: &File) {
        let mut slot = self.out.remove(i);
        slot.execute(file);
        let mut done = Some(slot);
        let out = &mut self.out;
        self.rq.complete(
            &mut || done.take(),
            self.ram,
            &self.disk,
            &self.file,
            &self.irq,
            &mut self.counters,
            &mut |slot| out.push(slot),
        );
    }

    fn ops(&self) -> Vec<Op> {
        self.out.iter().map(|s| s.request().op).collect()
    }
}

/// Drops the image's pages from the host's page cache (they are clean after a sync).
fn evict(file: &File) {
    file.sync_all().unwrap();
    // SAFETY: an advice call on an open descriptor; it changes no memory of ours.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

/// A small read whose data the host has cached is answered on the event loop, without
/// the hand-off to an I/O thread; a read the cache does not hold, a read above
/// CACHED_READ_MAX and reads beyond a pass's CACHED_PASS_BYTES go to the threads. (The
/// test's temporary directory must be on a file system that reads without waiting:
/// ext4, xfs, btrfs; tmpfs from Linux 6.6.)
#[test]
fn small_cached_reads_are_answered_on_the_event_loop() {
    let s = Scratch::new();
    let p = s.image("d.img", 4 * MIB, 0);
    let file = File::options().read(true).write(true).open(&p).unwrap();
    for i in 0..4u8 {
        file.write_all_at(&vec![i + 1; MIB as usize], u64::from(i) * MIB)
            .unwrap();
    }
    evict(&file);
    let ram = ram();
    let mut d = Driver::new(ram.memory());
    let mut q = ByHand::new(&ram, &d, 4 * MIB, &file);
    q.rq.set_cached_reads(true);
    // Not cached: handed out.
    let cold = d.request(t::IN, 0, &[(DATA, 4096, true)]);
    q.process();
    assert!(
        q.rq.tries_cached_reads(),
        "the file system reads without waiting"
    );
    assert_eq!(q.ops(), [Op::Read]);
    q.finish(0, &file);
    assert_eq!(d.status(cold), status::OK);
    // Cached (the whole image read once): a 4 KiB read is answered in the pass, a 64
    // KiB one is handed out.
    let mut whole = vec![0u8; 4 * MIB as usize];
    file.read_exact_at(&mut whole, 0).unwrap();
    let small = d.request(t::IN, 2048 + 8, &[(DATA + 4096, 4096, true)]);
    let large = d.request(t::IN, 0, &[(DATA + MIB, 64 << 10, true)]);
    q.process();
    assert_eq!(d.status(small), status::OK);
    assert_eq!(d.read(DATA + 4096, 4096), vec![2; 4096]);
    assert_eq!(q.ops(), [Op::Read], "the large read");
    assert_eq!(q.out[0].request().len, 64 << 10);
    assert_eq!(d.status(large), 0xff);
    q.finish(0, &file);
    assert_eq!(q.counters.cached_reads, 1);
    assert_eq!(q.counters.completed(Op::Read), 3);
    assert_eq!(q.counters.read_bytes, 4096 + 4096 + (64 << 10));
    // One pass copies at most CACHED_PASS_BYTES: the rest of 80 reads go out.
    let statuses: Vec<u64> = (0..80u64)
        .map(|i| d.request(t::IN, i * 8, &[(DATA + 2 * MIB + i * 4096, 4096, true)]))
        .collect();
    q.process();
    let inline = (CACHED_PASS_BYTES / 4096) as usize;
    assert_eq!(q.counters.cached_reads, 1 + inline as u64);
    assert_eq!(q.out.len(), 80 - inline, "the rest handed out");
    assert!(statuses[..inline]
        .iter()
        .all(|at| d.status(*at) == status::OK));
    assert_eq!(d.status(statuses[inline]), 0xff);
}

/// Requests complete in whatever order the I/O threads finish them; each used entry
/// names its own chain, and a request's status is written only when it completes.
#[test]
fn completions_out_of_order() {
    let s = Scratch::new();
    let p = s.image("d.img", MIB, 0);
    let file = File::options().read(true).write(true).open(&p).unwrap();
    file.write_all_at(&[1; 512], 0).unwrap();
    file.write_all_at(&[2; 512], 512).unwrap();
    file.write_all_at(&[3; 512], 1024).unwrap();
    let ram = ram();
    let mut d = Driver::new(ram.memory());
    let r: Vec<u64> = (0..3)
        .map(|i| d.request(t::IN, i, &[(DATA + i * 4096, 512, true)]))
        .collect();
    let mut q = ByHand::new(&ram, &d, MIB, &file);
    assert_eq!(q.process(), QueueWork::Done);
    assert_eq!(q.out.len(), 3);
    assert_eq!(q.rq.in_flight(), 3);
    // The last first, then the first, then the middle one.
    q.finish(2, &file);
    assert_eq!(d.used_count(), 1);
    assert_eq!(d.used_id(0), 6, "the third chain's head");
    assert_eq!(d.used_len(0), 513);
    assert_eq!(d.status(r[2]), status::OK);
    assert_eq!((d.status(r[0]), d.status(r[1])), (0xff, 0xff));
    assert_eq!(d.read(DATA + 2 * 4096, 512), vec![3; 512]);
    q.finish(0, &file);
    q.finish(0, &file);
    assert_eq!(d.used_count(), 3);
    assert_eq!((d.used_id(1), d.used_id(2)), (0, 3));
    for (i, at) in r.iter().enumerate() {
        assert_eq!(d.status(*at), status::OK);
        assert_eq!(d.read(DATA + i as u64 * 4096, 512), vec![i as u8 + 1; 512]);
    }
    assert_eq!(q.rq.in_flight(), 0);
    assert_eq!(q.counters.completed(Op::Read), 3);
}

/// A flush waits for every write taken off the ring before it; requests after it do not
/// wait for it, and a flush with no earlier write out goes at once.
#[test]
fn a_flush_waits_for_the_writes_before_it() {
    let s = Scratch::new();
    let p = s.image("d.img", MIB, 0);
    let file = File::options().read(true).write(true).open(&p).unwrap();
    let ram = ram();
    let mut d = Driver::new(ram.memory());
    d.fill(DATA, 1024, 0xaa);
    let w0 = d.request(t::OUT, 0, &[(DATA, 512, false)]);
    let w1 = d.request(t::OUT, 1, &[(DATA + 512, 512, false)]);
    let f = d.request(t::FLUSH, 0, &[]);
    let r = d.request(t::IN, 2, &[(DATA + 4096, 512, true)]);
    let mut q = ByHand::new(&ram, &d, MIB, &file);
    q.process();
    assert_eq!(
        q.ops(),
        [Op::Write, Op::Write, Op::Read],
        "the flush is held"
    );
    // The read after the flush completes first; the flush is still held.
    q.finish(2, &file);
    assert_eq!(d.status(r), status::OK);
    q.finish(1, &file);
    assert_eq!(q.ops(), [Op::Write], "one earlier write still out");
    assert_eq!(d.status(f), 0xff);
    q.finish(0, &file);
    assert_eq!(q.ops(), [Op::Flush], "released by the last earlier write");
    assert_eq!((d.status(w0), d.status(w1)), (status::OK, status::OK));
    assert_eq!(d.status(f), 0xff);
    q.finish(0, &file);
    assert_eq!(d.status(f), status::OK);
    assert_eq!(&file_bytes(&p)[..1024], &[0xaa; 1024][..]);
    // With no write out, a flush goes at once, and a write after it does not hold it.
    let f2 = d.request(t::FLUSH, 0, &[]);
    let w2 = d.request(t::OUT, 3, &[(DATA, 512, false)]);
    q.process();
    assert_eq!(q.ops(), [Op::Flush, Op::Write]);
    q.finish(0, &file);
    q.finish(0, &file);
    assert_eq!((d.status(f2), d.status(w2)), (status::OK, status::OK));
    assert_eq!(q.counters.completed(Op::Flush), 2);
}

/// However many requests the guest queues, at most MAX_IN_FLIGHT are off the ring; the
/// rest wait there, and each completion lets one more in.
#[test]
fn requests_in_flight_are_bounded() {
    let s = Scratch::new();
    let p = s.image("d.img", MIB, 0);
    let file = File::open(&p).unwrap();
    let ram = ram();
    let mut d = Driver::new(ram.memory());
    // 80 chains of 3 descriptors: 240 of the ring's 256.
    let statuses: Vec<u64> = (0..80)
        .map(|i| d.request(t::IN, i, &[(DATA + i * 512, 512, true)]))
        .collect();
    let mut q = ByHand::new(&ram, &d, MIB, &file);
    assert_eq!(
        q.process(),
        QueueWork::Done,
        "waits for slots, not another pass"
    );
    assert_eq!(q.out.len(), MAX_IN_FLIGHT);
    assert_eq!(q.process(), QueueWork::Done);
    assert_eq!(
        q.out.len(),
        MAX_IN_FLIGHT,
        "no slot free: nothing more taken"
    );
    q.finish(0, &file);
    assert_eq!(
        q.out.len(),
        MAX_IN_FLIGHT,
        "a completion takes the next one in"
    );
    while !q.out.is_empty() {
        q.finish(0, &file);
        assert!(q.out.len() <= MAX_IN_FLIGHT);
    }
    assert_eq!(d.used_count(), 80);
    assert!(statuses.iter().all(|at| d.status(*at) == status::OK));
}
