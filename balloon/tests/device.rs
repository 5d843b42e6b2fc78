//! The balloon device driven through mock virtqueues in real guest memory, as a guest
//! driver would: no VM, real `madvise`.

use ebb_balloon::policy::{PolicySettings, Reason};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ebb_balloon::protocol::*;
use ebb_balloon::{Balloon, BalloonOptions, HintDiscard, HintState};
use ebb_devices::ram::{Backing, GuestRam, HugePageLease, RamOptions};
use ebb_devices::virtio::{
    Activation, ActiveQueue, InterruptKind, QueueWork, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MIB: u64 = 1 << 20;
/// Region A: [0, 16 MiB); hole; region B: [32 MiB, 48 MiB).
const HOLE_START: u64 = 16 * MIB;
const B_START: u64 = 32 * MIB;
const RAM_END: u64 = 48 * MIB;
const RAM_BYTES: u64 = 32 * MIB;
const DATA: u64 = MIB;

fn ram() -> GuestRam {
    GuestRam::new(
        &[
            (GuestAddress(0), HOLE_START),
            (GuestAddress(B_START), RAM_END - B_START),
        ],
        RamOptions::default(),
    )
    .unwrap()
}

/// Host address and length of guest range `(gpa, len)`, for mincore.
fn host_span(ram: &GuestRam, (gpa, len): (u64, u64)) -> (usize, usize) {
    let host = ram.memory().get_host_address(GuestAddress(gpa)).unwrap();
    (host as usize, len as usize)
}

/// Pages of a host span resident in this process.
fn resident_span((host, len): (usize, usize)) -> usize {
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `vec` has one byte per page of the queried span, which is mapped guest RAM.
    let rc = unsafe { libc::mincore(host as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|b| **b & 1 != 0).count()
}

/// Pages of guest range `(gpa, len)` resident in this process.
fn resident(ram: &GuestRam, range: (u64, u64)) -> usize {
    resident_span(host_span(ram, range))
}

#[derive(Default)]
struct Irq {
    queue: AtomicU32,
    config: AtomicU32,
    /// A host range whose resident pages each queue interrupt records, to see what the
    /// host had already done when the guest was told.
    watch: Mutex<Option<(usize, usize)>>,
    resident_at_queue_irq: Mutex<Vec<usize>>,
}

impl VirtioInterrupt for Irq {
    fn trigger(&self, kind: InterruptKind) {
        match kind {
            InterruptKind::Queue => {
                if let Some(span) = *self.watch.lock().unwrap() {
                    let resident = resident_span(span);
                    self.resident_at_queue_irq.lock().unwrap().push(resident);
                }
                self.queue.fetch_add(1, Ordering::SeqCst)
            }
            InterruptKind::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
    }
}

/// A driver-side view of one queue: adds chains and reads the used ring.
struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    size: u16,
}

impl<'a> DriverQueue<'a> {
    fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        Self {
            mock: MockSplitQueue::create(mem, GuestAddress(base), size),
            next_desc: 0,
            size,
        }
    }

    fn queue(&self) -> Queue {
        self.mock.create_queue::<Queue>().unwrap()
    }

    /// Adds one chain of (address, length, device-writable) buffers.
    fn add(&mut self, bufs: &[(u64, u32, bool)]) {
        let start = self.next_desc;
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                let next = if i + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                    start + i as u16 + 1
                } else {
                    0
                };
                RawDescriptor::from(Descriptor::new(addr, len, flags, next))
            })
            .collect();
        self.mock.add_desc_chains(&descs, start).unwrap();
        self.next_desc = (start + bufs.len() as u16) % self.size;
    }

    fn used_count(&self) -> u16 {
        self.mock.used().idx().load()
    }
}

fn options(reporting: bool, stats: u32) -> BalloonOptions {
    BalloonOptions {
        target_pages: 0,
        deflate_on_oom: true,
        free_page_reporting: reporting,
        stats_interval_s: stats,
        free_page_hinting: false,
        hint_discard: Default::default(),
        deflate_prefault: true,
    }
}

/// Activates `b` with `features` and the given (index, queue) pairs.
fn activate(b: &mut Balloon, ram: &GuestRam, features: u64, queues: Vec<(u16, Queue)>) -> Arc<Irq> {
    let irq = Arc::new(Irq::default());
    b.activate(Activation {
        ram: ram.clone(),
        features,
        queues: queues
            .into_iter()
            .map(|(index, queue)| ActiveQueue { index, queue })
            .collect(),
        interrupt: irq.clone(),
    })
    .unwrap();
    irq
}

/// Activates `b` with the inflate and deflate queues every driver has (indexes 0 and 1,
/// made here) and `third` at index 2; returns them and the interrupt.
fn activate_beside<'a>(
    b: &mut Balloon,
    ram: &'a GuestRam,
    features: u64,
    third: &DriverQueue<'a>,
) -> (DriverQueue<'a>, DriverQueue<'a>, Arc<Irq>) {
    let mem = ram.memory();
    let inflate = DriverQueue::new(mem, 0x1000, 256);
    let deflate = DriverQueue::new(mem, 0x5000, 256);
    let irq = activate(
        b,
        ram,
        features,
        vec![
            (0, inflate.queue()),
            (1, deflate.queue()),
            (2, third.queue()),
        ],
    );
    (inflate, deflate, irq)
}

fn write_pfns(mem: &GuestMemoryMmap, at: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

fn touch(mem: &GuestMemoryMmap, start: u64, pages: u64) {
    for p in 0..pages {
        mem.write_obj(0x5au8, GuestAddress(start + p * 4096))
            .unwrap();
    }
}

fn pfn(gpa: u64) -> u32 {
    (gpa >> 12) as u32
}

struct Setup<'a> {
    inflate: DriverQueue<'a>,
    deflate: DriverQueue<'a>,
}

/// A balloon whose passes are bounded by their budgets of units only, so that tests can
/// count passes however slow the machine is (the time limit has a test of its own).
fn new_balloon(options: BalloonOptions, ram: &GuestRam) -> Balloon {
    let mut b = Balloon::new(options, ram).unwrap();
    b.set_pass_time_limit(Duration::from_secs(3600));
    b
}

fn basic(ram: &GuestRam) -> (Balloon, Setup<'_>, Arc<Irq>) {
    let mem = ram.memory();
    let mut b = new_balloon(options(false, 0), ram);
    let inflate = DriverQueue::new(mem, 0x1000, 256);
    let deflate = DriverQueue::new(mem, 0x5000, 256);
    let irq = activate(
        &mut b,
        ram,
        VIRTIO_F_VERSION_1 | F_DEFLATE_ON_OOM,
        vec![(0, inflate.queue()), (1, deflate.queue())],
    );
    (b, Setup { inflate, deflate }, irq)
}

#[test]
fn inflate_discards_for_real_and_deflate_accounts() {
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut q, irq) = basic(&ram);
    // 256 touched pages in region B.
    let start = B_START + 4 * MIB;
    touch(mem, start, 256);
    let range = (start, 256 * 4096);
    assert_eq!(resident(&ram, range), 256);

    let pfns: Vec<u32> = (0..256).map(|i| pfn(start) + i).collect();
    let len = write_pfns(mem, DATA, &pfns);
    q.inflate.add(&[(DATA, len, false)]);
    *irq.watch.lock().unwrap() = Some(host_span(&ram, range));
    b.process_queue(0);
    assert_eq!(q.inflate.used_count(), 1);
    assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
    assert_eq!(
        *irq.resident_at_queue_irq.lock().unwrap(),
        [0],
        "the pages had left the host when the guest was told"
    );
    assert_eq!(resident(&ram, range), 0, "host pages freed");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(start)).unwrap(), 0);
    let c = b.counters();
    assert_eq!(c.inflated_pages, 256);
    assert_eq!(c.madvise_calls, 1, "one merged range");
    assert_eq!(c.inflate_discarded_bytes, MIB);
    assert_eq!(b.held_pages(), 256);

    let len = write_pfns(mem, DATA, &pfns[..100]);
    q.deflate.add(&[(DATA, len, false)]);
    b.process_queue(1);
    assert_eq!(q.deflate.used_count(), 1);
    assert_eq!(b.counters().deflated_pages, 100);
    assert_eq!(b.held_pages(), 156);
    // Deflating pages that were never inflated is counted, not trusted.
    let len = write_pfns(mem, DATA, &[pfn(start) + 1, pfn(B_START)]);
    q.deflate.add(&[(DATA, len, false)]);
    b.process_queue(1);
    assert_eq!(b.counters().unknown_deflates, 2);
}

/// Indirect descriptors are never offered: a chain that points at an indirect table is
/// rejected and given back, and the PFNs its table names are not inflated. Without the
/// check virtio-queue follows the table and the pages are discarded.
#[test]
fn a_chain_through_an_indirect_table_is_rejected_unread() {
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut q, _irq) = basic(&ram);
    let start = B_START + 4 * MIB;
    touch(mem, start, 16);
    let pfns: Vec<u32> = (0..16).map(|i| pfn(start) + i).collect();
    let len = write_pfns(mem, DATA, &pfns);
    // The indirect table (one descriptor naming the PFN array) at DATA + 64 KiB.
    let table = DATA + 0x1_0000;
    mem.write_obj(
        RawDescriptor::from(Descriptor::new(DATA, len, 0, 0)),
        GuestAddress(table),
    )
    .unwrap();
    let head = q.inflate.next_desc;
    let indirect = RawDescriptor::from(Descriptor::new(
        table,
        16,
        virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    q.inflate.mock.add_desc_chains(&[indirect], head).unwrap();
    q.inflate.next_desc += 1;
    b.process_queue(0);
    assert_eq!(q.inflate.used_count(), 1, "given back");
    assert_eq!(b.counters().inflated_pages, 0);
    assert_eq!(b.counters().rejected_descriptors, 1);
    assert_eq!(resident(&ram, (start, 16 * 4096)), 16, "nothing discarded");

    // The queue keeps working.
    q.inflate.add(&[(DATA, len, false)]);
    b.process_queue(0);
    assert_eq!(q.inflate.used_count(), 2);
    assert_eq!(b.counters().inflated_pages, 16);
}

/// The used entry is written after the inflated pages are discarded. The guest inflates
/// the very page that holds the inflate queue's used ring: if the used entry were written
/// first, the discard would wipe it and the used index would read 0.
#[test]
fn inflated_pages_are_discarded_before_the_used_entry_is_written() {
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut q, _) = basic(&ram);
    let used_page = q.inflate.mock.used_addr().0 & !4095;
    touch(mem, used_page, 1);
    let len = write_pfns(mem, DATA, &[pfn(used_page)]);
    q.inflate.add(&[(DATA, len, false)]);
    b.process_queue(0);
    assert_eq!(b.counters().inflate_discarded_bytes, 4096);
    assert_eq!(
        q.inflate.used_count(),
        1,
        "the used entry survived the discard of its page"
    );
    assert_eq!(
        q.inflate.mock.used().ring().ref_at(0).unwrap().load().id(),
        0
    );
}

#[test]
fn first_and_last_pages_are_valid_but_hole_and_beyond_are_not() {
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut q, _) = basic(&ram);
    let pfns = [
        0,
        pfn(HOLE_START) - 1,
        pfn(HOLE_START),      // first page of the hole
        pfn(HOLE_START) + 77, // inside the hole
        pfn(B_START),
        pfn(RAM_END) - 1, // last page
        pfn(RAM_END),     // beyond RAM
        u32::MAX,
    ];
    let len = write_pfns(mem, DATA, &pfns);
    q.inflate.add(&[(DATA, len, false)]);
    b.process_queue(0);
    let c = b.counters();
    assert_eq!(c.inflated_pages, 4);
    assert_eq!(c.rejected_pfns, 4);
    assert_eq!(
        q.inflate.used_count(),
        1,
        "buffer returned despite bad entries"
    );
}

#[test]
fn duplicates_and_unsorted_pfns_merge_into_few_ranges() {
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut q, _) = basic(&ram);
    let base = pfn(B_START);
    let pfns = [
        base + 9,
        base + 3,
        base + 4,
        base + 3,
        base + 5,
        base + 8,
        base + 9,
        base + 20,
    ];
    let len = write_pfns(mem, DATA, &pfns);
    q.inflate.add(&[(DATA, len, false)]);
    b.process_queue(0);
    let c = b.counters();
    assert_eq!(c.madvise_calls, 3, "3-5, 8-9, 20");
    assert_eq!(c.inflate_discarded_bytes, 6 * 4096);
    assert_eq!(c.repeated_inflates, 2);
    assert_eq!(b.held_pages(), 6);
}

#[test]
fn an_array_spanning_both_regions_is_split() {
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut q, _) = basic(&ram);
    let pfns = [
        pfn(HOLE_START) - 2,
        pfn(HOLE_START) - 1,
        pfn(B_START),
        pfn(B_START) + 1,
    ];
    touch(mem, HOLE_START - 8192, 2);
    touch(mem, B_START, 2);
    let len = write_pfns(mem, DATA, &pfns);
    q.inflate.add(&[(DATA, len, false)]);
    b.process_queue(0);
    assert_eq!(b.counters().madvise_calls, 2);
    assert_eq!(b.counters().inflate_discarded_bytes, 4 * 4096);
    let a = (HOLE_START - 8192, 8192);
    let bb = (B_START, 8192);
    assert_eq!(resident(&ram, a), 0);
    assert_eq!(resident(&ram, bb), 0);
}

#[test]
fn malformed_buffers_are_counted_returned_and_the_device_keeps_working() {
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut q, _) = basic(&ram);
    write_pfns(mem, DATA, &[pfn(B_START); 8]);
    // Odd length, zero length, write-only, outside guest memory, in the hole, too long.
    q.inflate.add(&[(DATA, 7, false)]);
    q.inflate.add(&[(DATA, 0, false)]);
    q.inflate.add(&[(DATA, 8, true)]);
    q.inflate.add(&[(RAM_END + MIB, 8, false)]);
    q.inflate.add(&[(HOLE_START + 4096, 8, false)]);
    q.inflate.add(&[(DATA, 8192, false)]);
    // Over-long chain: 20 descriptors.
    let long: Vec<(u64, u32, bool)> = (0..20).map(|_| (DATA, 4, false)).collect();
    q.inflate.add(&long);
    b.process_queue(0);
    let c = b.counters();
    assert_eq!(c.rejected_descriptors, 7);
    assert_eq!(c.inflated_pages, 0);
    assert_eq!(c.madvise_calls, 0);
    assert_eq!(q.inflate.used_count(), 7, "every buffer goes back");

    // Still working.
    let len = write_pfns(mem, DATA, &[pfn(B_START)]);
    q.inflate.add(&[(DATA, len, false)]);
    b.process_queue(0);
    assert_eq!(b.counters().inflated_pages, 1);
    assert_eq!(q.inflate.used_count(), 8);
}

#[test]
fn a_corrupt_available_ring_stops_processing_without_looping() {
    let ram = ram();
    let (mut b, q, _) = basic(&ram);
    // Driver claims 1000 new buffers in a 256-entry ring.
    q.inflate.mock.avail().idx().store(1000);
    b.process_queue(0);
    assert!(b.counters().rejected_descriptors >= 1);
    assert_eq!(q.inflate.used_count(), 0);
}

#[test]
fn target_and_actual_in_config_space() {
    let ram = ram();
    let (mut b, _q, irq) = basic(&ram);
    b.set_target_pages(1000).unwrap();
    assert_eq!(irq.config.load(Ordering::SeqCst), 1);
    let mut four = [0u8; 4];
    b.read_config(0, &mut four);
    assert_eq!(u32::from_le_bytes(four), 1000);
    b.write_config(4, &900u32.to_le_bytes());
    assert_eq!(b.actual_pages(), 900);
    // The guest may not write the target, odd widths, or an impossible size.
    b.write_config(0, &5u32.to_le_bytes());
    b.write_config(4, &[1, 2]);
    b.write_config(4, &u32::MAX.to_le_bytes());
    b.write_config(12, &1u32.to_le_bytes()); // no PAGE_POISON offered
    assert_eq!(b.counters().rejected_config_writes, 4);
    assert_eq!(b.target_pages(), 1000);
    assert_eq!(b.actual_pages(), 900);
    // Reads past the config space are zeros.
    b.read_config(8, &mut four);
    assert_eq!(four, [0; 4]);
    assert!(b.set_target_pages(RAM_BYTES / 4096 + 1).is_err());
}

#[test]
fn pages_the_guest_takes_back_below_the_target_are_counted_as_deflate_on_oom() {
    let ram = ram();
    let (mut b, _q, _irq) = basic(&ram);
    b.set_target_pages(1000).unwrap();
    // Inflating towards the target, then a deflate the host asked for.
    b.write_config(4, &600u32.to_le_bytes());
    b.write_config(4, &1000u32.to_le_bytes());
    b.set_target_pages(700).unwrap();
    b.write_config(4, &700u32.to_le_bytes());
    assert_eq!(b.counters().oom_deflated_pages, 0);
    // The guest gives back 44 pages it was not asked for, then 6 more on the way up.
    b.write_config(4, &656u32.to_le_bytes());
    assert_eq!(b.counters().oom_deflated_pages, 44);
    b.set_target_pages(800).unwrap();
    b.write_config(4, &650u32.to_le_bytes());
    assert_eq!(b.counters().oom_deflated_pages, 50);
}

#[test]
fn offered_features_and_queue_sizes_follow_options() {
    let ram = ram();
    let b = new_balloon(options(true, 5), &ram);
    assert_eq!(
        b.features(),
        VIRTIO_F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM | F_PAGE_REPORTING | F_PAGE_POISON
    );
    assert_eq!(b.queue_max_sizes(), vec![256, 256, 2, 32]);
    let b = new_balloon(options(true, 0), &ram);
    assert_eq!(b.queue_max_sizes(), vec![256, 256, 32]);
    let b = new_balloon(options(false, 0), &ram);
    assert_eq!(b.queue_max_sizes(), vec![256, 256]);
    assert_eq!(
        b.features() & (F_PAGE_POISON | F_PAGE_REPORTING | F_STATS_VQ),
        0
    );
    assert!(Balloon::new(
        BalloonOptions {
            target_pages: (RAM_BYTES / 4096 + 1) as u32,
            ..options(false, 0)
        },
        &ram
    )
    .is_err());
}

/// Reporting is at index 3 with stats and at index 2 without: drive it at the index the
/// negotiated features give and check the discard happened.
#[test]
fn reporting_queue_index_follows_negotiated_features() {
    for (stats, features, index) in [
        (5, F_STATS_VQ | F_PAGE_REPORTING, 3u16),
        (0, F_PAGE_REPORTING, 2u16),
        // Stats offered but not accepted by the driver: reporting moves down to 2.
        (5, F_PAGE_REPORTING, 2u16),
    ] {
        let ram = ram();
        let mem = ram.memory();
        let mut b = new_balloon(options(true, stats), &ram);
        let inflate = DriverQueue::new(mem, 0x1000, 256);
        let deflate = DriverQueue::new(mem, 0x5000, 256);
        let mut report = DriverQueue::new(mem, 0x9000, 32);
        let mut queues = vec![(0, inflate.queue()), (1, deflate.queue())];
        let stats_q = DriverQueue::new(mem, 0xd000, 2);
        if features & F_STATS_VQ != 0 {
            queues.push((2, stats_q.queue()));
        }
        queues.push((index, report.queue()));
        activate(&mut b, &ram, VIRTIO_F_VERSION_1 | features, queues);
        touch(mem, B_START, 512);
        report.add(&[(B_START, 2 * MIB as u32, true)]);
        b.process_queue(index);
        assert_eq!(
            b.counters().reported_discarded_bytes,
            2 * MIB,
            "features {features:#x}"
        );
        let r = (B_START, 2 * MIB);
        assert_eq!(resident(&ram, r), 0);
    }
}

fn reporting_setup(ram: &GuestRam) -> (Balloon, DriverQueue<'_>, Arc<Irq>) {
    let mem = ram.memory();
    let mut b = new_balloon(options(true, 0), ram);
    let report = DriverQueue::new(mem, 0x9000, 32);
    let (_inflate, _deflate, irq) = activate_beside(
        &mut b,
        ram,
        VIRTIO_F_VERSION_1 | F_PAGE_REPORTING | F_PAGE_POISON,
        &report,
    );
    (b, report, irq)
}

#[test]
fn multi_entry_reports_discard_every_valid_range() {
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut report, irq) = reporting_setup(&ram);
    touch(mem, B_START, 4096);
    let ranges: Vec<(u64, u32, bool)> = (0..4)
        .map(|i| (B_START + i * 2 * MIB, 2 * MIB as u32, true))
        .collect();
    report.add(&ranges);
    b.process_queue(2);
    let c = b.counters();
    assert_eq!((c.reports, c.reported_ranges, c.rejected_ranges), (1, 4, 0));
    assert_eq!(c.reported_discarded_bytes, 8 * MIB);
    assert_eq!(report.used_count(), 1);
    assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
    assert_eq!(c.report_latency.count, 1);
    assert!(c.report_latency.quantile_us(0.5).is_some());
    let r = (B_START, 8 * MIB);
    assert_eq!(resident(&ram, r), 0);
    let rest = (B_START + 8 * MIB, 8 * MIB);
    assert_eq!(resident(&ram, rest), 2048, "unreported pages stay");
}

#[test]
fn bad_report_entries_are_rejected_one_by_one() {
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut report, _) = reporting_setup(&ram);
    touch(mem, B_START, 16);
    report.add(&[
        (B_START, 4096, true),           // good
        (RAM_END, 4096, true),           // beyond RAM
        (B_START + 100, 4096, true),     // unaligned address
        (B_START, 4097, true),           // unaligned length
        (u64::MAX - 4095, 8192, true),   // overflows
        (B_START, 0, true),              // empty
        (HOLE_START, 4096, true),        // in the hole
        (HOLE_START - 4096, 8192, true), // runs into the hole
        (B_START + 4096, 4096, false),   // device-readable: not a report
        (B_START + 8192, 4096, true),    // good
    ]);
    b.process_queue(2);
    let c = b.counters();
    assert_eq!(c.reported_ranges, 2);
    assert_eq!(c.rejected_ranges, 8);
    assert_eq!(c.reported_discarded_bytes, 8192);
    assert_eq!(report.used_count(), 1);
}

#[test]
fn oversized_reports_stop_at_capacity() {
    let ram = ram();
    let mem = ram.memory();
    let mut b = new_balloon(options(true, 0), &ram);
    // A driver that sized the ring bigger than Ebb offers cannot pass activation through
    // the transport, but the device must still bound what it reads.
    let mut report = DriverQueue::new(mem, 0x9000, 64);
    let (_inflate, _deflate, _irq) =
        activate_beside(&mut b, &ram, VIRTIO_F_VERSION_1 | F_PAGE_REPORTING, &report);
    let ranges: Vec<(u64, u32, bool)> = (0..40).map(|i| (B_START + i * 4096, 4096, true)).collect();
    report.add(&ranges);
    b.process_queue(2);
    let c = b.counters();
    assert_eq!(c.reported_ranges, REPORT_CAPACITY as u64);
    assert_eq!(c.rejected_ranges, 1);
    assert_eq!(report.used_count(), 1);
}

#[test]
fn poisoned_free_pages_are_kept() {
    let ram = ram();
    let mem = ram.memory();
    let mut b = new_balloon(options(true, 0), &ram);
    // The guest writes poison_val during probe, before DRIVER_OK.
    b.write_config(12, &0xaaaa_aaaau32.to_le_bytes());
    let mut report = DriverQueue::new(mem, 0x9000, 32);
    let (_inflate, _deflate, _irq) = activate_beside(
        &mut b,
        &ram,
        VIRTIO_F_VERSION_1 | F_PAGE_REPORTING | F_PAGE_POISON,
        &report,
    );
    touch(mem, B_START, 512);
    report.add(&[(B_START, 2 * MIB as u32, true)]);
    b.process_queue(2);
    let c = b.counters();
    assert_eq!((c.skipped_ranges, c.skipped_bytes), (1, 2 * MIB));
    assert_eq!(c.reported_discarded_bytes, 0);
    let r = (B_START, 2 * MIB);
    assert_eq!(resident(&ram, r), 512, "poisoned pages stay");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(B_START)).unwrap(), 0x5a);
    assert_eq!(report.used_count(), 1);
}

#[test]
fn zero_poison_from_init_on_free_still_discards() {
    let ram = ram();
    let mem = ram.memory();
    let mut b = new_balloon(options(true, 0), &ram);
    b.write_config(12, &0u32.to_le_bytes());
    let mut report = DriverQueue::new(mem, 0x9000, 32);
    let (_inflate, _deflate, _irq) = activate_beside(
        &mut b,
        &ram,
        VIRTIO_F_VERSION_1 | F_PAGE_REPORTING | F_PAGE_POISON,
        &report,
    );
    touch(mem, B_START, 512);
    report.add(&[(B_START, 2 * MIB as u32, true)]);
    b.process_queue(2);
    assert_eq!(b.counters().reported_discarded_bytes, 2 * MIB);
    assert_eq!(b.counters().rejected_config_writes, 0);
}

fn stats_entry(tag: u16, value: u64) -> Vec<u8> {
    let mut e = tag.to_le_bytes().to_vec();
    e.extend_from_slice(&value.to_le_bytes());
    e
}

#[test]
fn stats_buffer_primed_before_activation_is_read_and_held() {
    let ram = ram();
    let mem = ram.memory();
    let mut b = new_balloon(options(false, 1), &ram);
    let inflate = DriverQueue::new(mem, 0x1000, 256);
    let deflate = DriverQueue::new(mem, 0x5000, 256);
    let mut stats = DriverQueue::new(mem, 0x9000, 2);
    let mut buf = Vec::new();
    for t in 0..10u16 {
        buf.extend(stats_entry(t, u64::from(t) * 100));
    }
    buf.extend(stats_entry(200, 1)); // unknown tag
    buf.extend_from_slice(&[4, 0, 9]); // truncated entry
    mem.write_slice(&buf, GuestAddress(DATA)).unwrap();
    // Linux queues the first statistics buffer during probe, before DRIVER_OK.
    stats.add(&[(DATA, buf.len() as u32, false)]);
    let irq = activate(
        &mut b,
        &ram,
        VIRTIO_F_VERSION_1 | F_STATS_VQ,
        vec![
            (0, inflate.queue()),
            (1, deflate.queue()),
            (2, stats.queue()),
        ],
    );
    // Activation runs on the vCPU thread: it reads nothing; the transport's kick after
    // DRIVER_OK brings the event loop here.
    assert!(b.stats().is_none(), "no device work inside activation");
    assert_eq!(b.process_queue(2), QueueWork::Done);
    let s = b.stats().expect("stats read on the first pass").clone();
    assert_eq!(s.free_memory, Some(400));
    assert_eq!(s.total_memory, Some(500));
    assert_eq!(s.hugetlb_failures, Some(900));
    assert_eq!((s.unknown_tags, s.truncated_bytes), (1, 3));
    assert_eq!(
        stats.used_count(),
        0,
        "the buffer is held until Ebb wants new numbers"
    );

    // The timer returns it; the guest refills and re-adds it.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    b.process_event(0);
    assert_eq!(stats.used_count(), 1);
    assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
    mem.write_slice(&stats_entry(4, 12345), GuestAddress(DATA))
        .unwrap();
    stats.add(&[(DATA, 10, false)]);
    b.process_queue(2);
    assert_eq!(b.stats().unwrap().free_memory, Some(12345));
    assert_eq!(b.counters().stats_updates, 2);

    // A write-only stats buffer is rejected but still held and returned later.
    stats.add(&[(DATA, 10, true)]);
    b.process_queue(2);
    assert_eq!(b.counters().rejected_descriptors, 1);
    assert_eq!(
        stats.used_count(),
        2,
        "the previously held buffer went back"
    );
}

/// A host pressure source with a fixed figure.
struct FixedPressure(f64);

impl ebb_balloon::policy::HostPressure for FixedPressure {
    fn memory_some_avg10(&mut self) -> Option<f64> {
        Some(self.0)
    }
}

/// Policy settings scaled to the test's 32 MiB of guest RAM: 4 MiB of headroom, 2 MiB
/// steps.
fn small_policy() -> ebb_balloon::policy::PolicySettings {
    ebb_balloon::policy::PolicySettings {
        headroom: 4 * MIB,
        min: 0,
        max: 24 * MIB,
        step: 2 * MIB,
        ..ebb_balloon::policy::PolicySettings::for_ram(RAM_BYTES)
    }
}

/// With the policy on, each statistics report sets the target (and tells the guest);
/// with it off, or without statistics, the target is the host's alone.
#[test]
fn the_policy_sets_the_target_from_each_statistics_report() {
    use ebb_balloon::policy::{AutoPolicy, Reason};
    let ram = ram();
    let mem = ram.memory();
    let mut plain = new_balloon(options(false, 0), &ram);
    let settings = small_policy();
    assert!(plain
        .set_policy(AutoPolicy::new(settings, true), None)
        .is_err());
    let mut b = new_balloon(options(false, 1), &ram);
    b.set_policy(
        AutoPolicy::new(settings, true),
        Some(Box::new(FixedPressure(0.0))),
    )
    .unwrap();
    let mut stats = DriverQueue::new(mem, 0x9000, 2);
    let (_inflate, _deflate, irq) =
        activate_beside(&mut b, &ram, VIRTIO_F_VERSION_1 | F_STATS_VQ, &stats);
    let configs_before = irq.config.load(Ordering::SeqCst);
    let mut report = |available: u64| {
        let mut buf = stats_entry(6, available);
        buf.extend(stats_entry(2, 0));
        mem.write_slice(&buf, GuestAddress(DATA)).unwrap();
        stats.add(&[(DATA, buf.len() as u32, false)]);
        b.process_queue(2);
        (
            u64::from(b.target_pages()) * 4096 / MIB,
            b.policy().unwrap().last_decision().unwrap().reason,
        )
    };
    // 20 MiB available, headroom 4: a step of 2 MiB.
    assert_eq!(report(20 * MIB), (2, Reason::Inflate));
    assert!(
        irq.config.load(Ordering::SeqCst) > configs_before,
        "guest told"
    );
    // The guest has not inflated (actual 0): the policy waits for it.
    assert_eq!(report(20 * MIB), (2, Reason::Catching));
    // Short of memory: back to 0 at once.
    assert_eq!(report(MIB), (0, Reason::DeflateLow));
    // Off: reports change nothing.
    b.policy_mut().unwrap().set_enabled(false);
    b.set_target_pages(100).unwrap();
    mem.write_slice(&stats_entry(6, 20 * MIB), GuestAddress(DATA))
        .unwrap();
    stats.add(&[(DATA, 10, false)]);
    b.process_queue(2);
    assert_eq!(b.target_pages(), 100);
}

/// A balloon with the automatic policy (off until a test turns it on) and its inflate,
/// deflate and statistics queues, holding the 512 pages from [`PREFAULT_START`]: the
/// guest inflated them towards a 512-page target and said so.
struct PolicyBalloon<'a> {
    b: Balloon,
    deflate: DriverQueue<'a>,
    stats: DriverQueue<'a>,
    irq: Arc<Irq>,
    pfns: Vec<u32>,
}

const PREFAULT_START: u64 = B_START + 4 * MIB;

fn policy_balloon(
    ram: &GuestRam,
    options: BalloonOptions,
    settings: ebb_balloon::policy::PolicySettings,
) -> PolicyBalloon<'_> {
    let mem = ram.memory();
    let mut b = new_balloon(options, ram);
    b.set_policy(ebb_balloon::policy::AutoPolicy::new(settings, false), None)
        .unwrap();
    let stats = DriverQueue::new(mem, 0x9000, 2);
    let (mut inflate, deflate, irq) = activate_beside(
        &mut b,
        ram,
        VIRTIO_F_VERSION_1 | F_STATS_VQ | F_DEFLATE_ON_OOM,
        &stats,
    );
    let pfns: Vec<u32> = (0..512).map(|i| pfn(PREFAULT_START) + i).collect();
    touch(mem, PREFAULT_START, 512);
    b.set_target_pages(512).unwrap();
    let len = write_pfns(mem, DATA, &pfns);
    inflate.add(&[(DATA, len, false)]);
    b.process_queue(0);
    b.write_config(4, &512u32.to_le_bytes());
    PolicyBalloon {
        b,
        deflate,
        stats,
        irq,
        pfns,
    }
}

impl PolicyBalloon<'_> {
    /// The guest gives back pages `[from, to)` of the 512; returns how many of them were
    /// resident on the host when the guest was told.
    fn give_back(&mut self, ram: &GuestRam, from: u32, to: u32) -> usize {
        let len = write_pfns(ram.memory(), DATA, &self.pfns[from as usize..to as usize]);
        self.deflate.add(&[(DATA, len, false)]);
        *self.irq.watch.lock().unwrap() = Some(host_span(ram, span(from, to)));
        self.b.process_queue(1);
        self.irq
            .resident_at_queue_irq
            .lock()
            .unwrap()
            .pop()
            .unwrap()
    }

    /// A statistics report of `available` bytes and `major_faults`; returns the
    /// policy's reason.
    fn report(&mut self, ram: &GuestRam, available: u64, major_faults: u64) -> Reason {
        let mut buf = stats_entry(6, available);
        buf.extend(stats_entry(2, major_faults));
        ram.memory().write_slice(&buf, GuestAddress(DATA)).unwrap();
        self.stats.add(&[(DATA, buf.len() as u32, false)]);
        self.b.process_queue(2);
        self.b.policy().unwrap().last_decision().unwrap().reason
    }
}

/// Pages `[from, to)` of the 512 from [`PREFAULT_START`].
fn span(from: u32, to: u32) -> (u64, u64) {
    (
        PREFAULT_START + u64::from(from) * 4096,
        u64::from(to - from) * 4096,
    )
}

/// A guest that is short of memory uses what it takes back from the balloon at once:
/// those pages are backed on the host before the deflate buffer goes back (the guest frees
/// them only then), one call per run instead of a host fault per page. Short means the
/// policy deflated for need, or the guest took pages below the target itself
/// (deflate-on-OOM). Pages a smaller target asked for through the API are left to fault
/// in, and with `deflate_prefault` off nothing is backed.
#[test]
fn pages_a_short_guest_takes_back_are_backed_before_it_gets_them() {
    for prefault in [true, false] {
        let ram = ram();
        let options = BalloonOptions {
            deflate_prefault: prefault,
            ..options(false, 1)
        };
        let settings = small_policy();
        let mut p = policy_balloon(&ram, options, settings);
        assert_eq!(resident(&ram, span(0, 512)), 0);
        // Asked through the API: left to fault in.
        p.b.set_target_pages(412).unwrap();
        assert_eq!(p.give_back(&ram, 0, 100), 0);
        // Below the target, unasked (deflate-on-OOM): backed when the guest is told.
        let backed = if prefault { 50 } else { 0 };
        assert_eq!(p.give_back(&ram, 100, 150), backed);
        assert_eq!(
            resident(&ram, span(0, 1)),
            0,
            "the asked-for pages still are not"
        );
        // The policy deflates for need: every page it asks for is backed.
        p.b.set_target_pages(362).unwrap();
        p.b.policy_mut().unwrap().set_enabled(true);
        assert_eq!(p.report(&ram, MIB, 0), Reason::DeflateLow);
        let asked = 362 - p.b.target_pages();
        assert!(asked >= 100, "asked for {asked} pages");
        let backed = if prefault { 100 } else { 0 };
        assert_eq!(p.give_back(&ram, 150, 250), backed);
        let c = p.b.counters();
        let expected = if prefault { 150 * 4096 } else { 0 };
        assert_eq!(c.prefaulted_bytes, expected);
        assert_eq!(c.prefault_failures, 0);
        assert_eq!(
            ram.memory()
                .read_obj::<u8>(GuestAddress(span(120, 121).0))
                .unwrap(),
            0,
            "a backed page reads as the zeros the guest expects"
        );
    }
}

/// A deflate for need can give back more than the guest needs at once (a step against
/// major faults, the end of a trim): what is backed ahead of the guest stops at a
/// headroom.
#[test]
fn backing_ahead_of_a_short_guest_stops_at_a_headroom() {
    let ram = ram();
    let settings = PolicySettings {
        headroom: 64 * 4096,
        min: 0,
        max: 24 * MIB,
        step: 2 * MIB,
        fault_rate: 10,
        ..PolicySettings::for_ram(RAM_BYTES)
    };
    let mut p = policy_balloon(&ram, options(false, 1), settings);
    p.b.policy_mut().unwrap().set_enabled(true);
    // Plenty available, then a burst of major faults: a step's deflate (512 pages).
    p.report(&ram, 16 * MIB, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(p.report(&ram, 16 * MIB, 1_000_000), Reason::DeflateFaults);
    assert_eq!(p.b.target_pages(), 0);
    p.give_back(&ram, 0, 512);
    assert_eq!(p.b.held_pages(), 0);
    assert_eq!(
        p.b.counters().prefaulted_bytes,
        64 * 4096,
        "a headroom, not 512 pages"
    );
}

/// Whether the statistics timer of `b` fires within `ms` milliseconds.
fn stats_timer_fires_within(b: &Balloon, ms: i32) -> bool {
    let (fd, _) = b.event_fds()[0];
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack, for a descriptor the balloon keeps open.
    unsafe { libc::poll(&mut p, 1, ms) == 1 }
}

/// While the policy sees the guest short (it deflated for need, or the guest deflated
/// below the target on OOM), statistics come every 250 ms instead of every interval;
/// back at the interval once the guest is not short, or the policy is off. A guest
/// repeating its OOM deflates does not hold the next request back.
#[test]
fn a_short_guest_is_asked_for_statistics_four_times_a_second() {
    let ram = ram();
    let mut p = policy_balloon(&ram, options(false, 10), small_policy());
    p.b.policy_mut().unwrap().set_enabled(true);
    assert!(!stats_timer_fires_within(&p.b, 600), "every 10 s at first");
    assert_eq!(p.report(&ram, MIB, 0), Reason::DeflateLow);
    assert!(p.b.short_stats());
    assert!(
        stats_timer_fires_within(&p.b, 600),
        "every 250 ms when short"
    );
    // The policy off: the next report goes back to the interval. A deflate-on-OOM
    // meanwhile is no news once it is on again (below).
    p.b.policy_mut().unwrap().set_enabled(false);
    p.b.set_target_pages(512).unwrap();
    p.b.write_config(4, &500u32.to_le_bytes());
    assert_eq!(p.b.counters().oom_deflated_pages, 12);
    p.report(&ram, MIB, 0);
    assert!(!p.b.short_stats());
    p.b.process_event(0);
    assert!(!stats_timer_fires_within(&p.b, 600));
    // A guest behind a larger target (inflating) is not short.
    p.b.policy_mut().unwrap().set_enabled(true);
    p.b.set_target_pages(1024).unwrap();
    p.report(&ram, 16 * MIB, 0);
    assert!(!p.b.short_stats(), "catching up is no shortage");
    // Deflate-on-OOM, repeated every 100 ms: the first makes requests fast, the others
    // do not push the next one back.
    p.b.set_target_pages(512).unwrap();
    for actual in (400u32..405).rev() {
        p.b.write_config(4, &actual.to_le_bytes());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(p.b.short_stats());
    // 500 ms after the first: fired already (each write re-arming would leave 150 ms).
    assert!(stats_timer_fires_within(&p.b, 0));
}

#[test]
fn stats_interval_cannot_be_enabled_when_off_at_boot() {
    let ram = ram();
    let mut b = new_balloon(options(false, 0), &ram);
    assert!(b.set_stats_interval(5).is_err());
    let mut b = new_balloon(options(false, 2), &ram);
    assert!(b.set_stats_interval(5).is_ok());
    assert_eq!(b.stats_interval_s(), 5);
    assert!(b.set_stats_interval(0).is_ok());
}

#[test]
fn activation_without_inflate_or_deflate_is_refused() {
    let ram = ram();
    let mem = ram.memory();
    let mut b = new_balloon(options(false, 0), &ram);
    let inflate = DriverQueue::new(mem, 0x1000, 256);
    let r = b.activate(Activation {
        ram: ram.clone(),
        features: VIRTIO_F_VERSION_1,
        queues: vec![ActiveQueue {
            index: 0,
            queue: inflate.queue(),
        }],
        interrupt: Arc::new(Irq::default()),
    });
    assert!(r.is_err());
}

#[test]
fn reset_forgets_guest_state_but_keeps_the_target() {
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut q, _) = basic(&ram);
    b.set_target_pages(10).unwrap();
    let len = write_pfns(mem, DATA, &[pfn(B_START)]);
    q.inflate.add(&[(DATA, len, false)]);
    b.process_queue(0);
    b.write_config(4, &1u32.to_le_bytes());
    b.reset();
    assert_eq!(b.actual_pages(), 0);
    assert_eq!(b.held_pages(), 0);
    assert_eq!(b.target_pages(), 10);
    // Kicks after reset do nothing.
    q.inflate.add(&[(DATA, len, false)]);
    b.process_queue(0);
    assert_eq!(b.counters().inflated_pages, 1);
}

/// A guest keeps the inflate ring full of entries naming one chain of 16 descriptors, each
/// a 4 KiB array of 1024 scattered page numbers. Each pass stops at the budget and says so;
/// the pages are discarded once, however often they are named.
#[test]
fn an_inflate_flood_is_worked_off_in_bounded_passes_and_discarded_once() {
    use ebb_balloon::queues::inflate::PFN_BUDGET;
    let ram = ram();
    let mem = ram.memory();
    let (mut b, q, _) = basic(&ram);
    // Every other page of region B's first 8 MiB: 1024 PFNs, none adjacent.
    let pfns: Vec<u32> = (0..1024).map(|i| pfn(B_START) + 2 * i).collect();
    write_pfns(mem, DATA, &pfns);
    for i in 0..16u16 {
        let flags = if i < 15 { VRING_DESC_F_NEXT as u16 } else { 0 };
        let desc = Descriptor::new(DATA, 4096, flags, i + 1);
        q.inflate
            .mock
            .desc_table()
            .store(i, RawDescriptor::from(desc))
            .unwrap();
    }
    // 128 entries: the mock lays the used ring over the avail ring's second half.
    let entries = 128;
    for slot in 0..entries {
        q.inflate.mock.avail().ring().ref_at(slot).unwrap().store(0);
    }
    q.inflate.mock.avail().idx().store(entries as u16);

    let per_chain = 16 * 1024;
    let mut passes = 0;
    let mut used_before = 0;
    loop {
        let work = b.process_queue(0);
        passes += 1;
        let used = q.inflate.used_count();
        let chains = u64::from(used - used_before);
        assert!(
            chains * per_chain <= PFN_BUDGET + per_chain,
            "pass {passes} read {chains} chains of {per_chain} PFNs"
        );
        used_before = used;
        if work == QueueWork::Done {
            break;
        }
        assert!(passes < 1000, "the flood never ends");
    }
    assert_eq!(
        q.inflate.used_count(),
        entries as u16,
        "every entry went back"
    );
    assert!(
        passes >= entries / 2,
        "{passes} passes for {entries} maximal chains"
    );
    let c = b.counters();
    assert_eq!(c.rejected_descriptors, 0);
    assert_eq!(c.inflated_pages, entries as u64 * per_chain);
    assert_eq!(c.madvise_calls, 1024, "each page discarded once");
    assert_eq!(c.inflate_discarded_bytes, 1024 * 4096);
    assert_eq!(b.held_pages(), 1024);
}

/// A report naming far more memory than one wake-up may discard is finished over several
/// passes, and goes back only when all of it is discarded.
#[test]
fn a_huge_report_is_discarded_over_several_passes() {
    use ebb_balloon::queues::reporting::REPORT_BUDGET_BYTES;
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut report, irq) = reporting_setup(&ram);
    let region_b = RAM_END - B_START;
    touch(mem, B_START, region_b / 4096);
    // 32 entries naming all of region B each.
    let entries: Vec<(u64, u32, bool)> =
        (0..32).map(|_| (B_START, region_b as u32, true)).collect();
    report.add(&entries);
    let total = 32 * region_b;
    assert_eq!(b.process_queue(2), QueueWork::Yielded);
    assert_eq!(
        report.used_count(),
        0,
        "not back before it is all discarded"
    );
    // Each pass stops at its byte budget (or sooner, at its time limit).
    let mut passes = 1;
    let mut discarded = b.counters().reported_discarded_bytes;
    assert!(discarded <= REPORT_BUDGET_BYTES, "first pass: {discarded}");
    loop {
        let work = b.process_queue(2);
        passes += 1;
        let now = b.counters().reported_discarded_bytes;
        assert!(
            now - discarded <= REPORT_BUDGET_BYTES,
            "pass {passes}: {now}"
        );
        assert!(
            now > discarded || work == QueueWork::Done,
            "pass {passes} did nothing"
        );
        discarded = now;
        if work == QueueWork::Done {
            break;
        }
        assert!(passes < 100_000, "the report never ends");
    }
    assert!(
        passes >= total.div_ceil(REPORT_BUDGET_BYTES),
        "{passes} passes"
    );
    assert_eq!(report.used_count(), 1);
    assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
    let c = b.counters();
    assert_eq!(c.reported_discarded_bytes, total);
    assert_eq!(resident(&ram, (B_START, region_b)), 0);
}

/// However much budget a pass has left, it yields when its time is up: with no time at
/// all, each pass discards one range, and the report goes back only after the last.
#[test]
fn a_pass_yields_when_its_time_is_up() {
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut report, _irq) = reporting_setup(&ram);
    b.set_pass_time_limit(Duration::ZERO);
    touch(mem, B_START, 4 * 512);
    let ranges: Vec<(u64, u32, bool)> = (0..4)
        .map(|i| (B_START + i * 2 * MIB, 2 * MIB as u32, true))
        .collect();
    report.add(&ranges);
    let mut discarded = Vec::new();
    while b.process_queue(2) == QueueWork::Yielded {
        discarded.push(b.counters().reported_discarded_bytes);
        assert!(discarded.len() < 100, "never done: {discarded:?}");
    }
    let mib = |v: &[u64]| v.iter().map(|b| b / MIB).collect::<Vec<_>>();
    // Taking the report off the ring is the first pass's work; then one range a pass.
    assert_eq!(mib(&discarded), [0, 2, 4, 6, 8], "bytes after each pass");
    assert_eq!(report.used_count(), 1);
    assert_eq!(resident(&ram, (B_START, 8 * MIB)), 0);
}

fn fenced_ram() -> GuestRam {
    GuestRam::new(
        &[
            (GuestAddress(0), HOLE_START),
            (GuestAddress(B_START), RAM_END - B_START),
        ],
        RamOptions {
            write_fence: true,
            ..RamOptions::default()
        },
    )
    .expect("userfaultfd write protection (run as root or with vm.unprivileged_userfaultfd=1)")
}

/// A balloon with hinting and reporting: the free page queue is 2, reporting 3.
fn hinting_setup(ram: &GuestRam, mode: HintDiscard) -> (Balloon, DriverQueue<'_>, Arc<Irq>) {
    let mem = ram.memory();
    let opts = BalloonOptions {
        free_page_hinting: true,
        hint_discard: mode,
        deflate_prefault: true,
        ..options(true, 0)
    };
    let mut b = new_balloon(opts, ram);
    assert_ne!(b.features() & F_FREE_PAGE_HINT, 0);
    let inflate = DriverQueue::new(mem, 0x1000, 256);
    let deflate = DriverQueue::new(mem, 0x5000, 256);
    let hint = DriverQueue::new(mem, 0x9000, 256);
    let report = DriverQueue::new(mem, 0xd000, 32);
    let irq = activate(
        &mut b,
        ram,
        VIRTIO_F_VERSION_1 | F_FREE_PAGE_HINT | F_PAGE_REPORTING,
        vec![
            (0, inflate.queue()),
            (1, deflate.queue()),
            (2, hint.queue()),
            (3, report.queue()),
        ],
    );
    (b, hint, irq)
}

fn cmd_id(b: &Balloon) -> u32 {
    let mut bytes = [0u8; 4];
    b.read_config(config::FREE_PAGE_HINT_CMD_ID, &mut bytes);
    u32::from_le_bytes(bytes)
}

/// Where the guest writes the command ids it sends.
const CMD_AT: u64 = 0x20000;

fn send_cmd(mem: &GuestMemoryMmap, q: &mut DriverQueue<'_>, id: u32, slot: u64) {
    let at = CMD_AT + slot * 4;
    mem.write_obj(id.to_le(), GuestAddress(at)).unwrap();
    q.add(&[(at, 4, false)]);
}

#[test]
fn a_hinting_run_discards_zeroed_blocks_keeps_written_pages_and_says_done() {
    let ram = fenced_ram();
    let mem = ram.memory();
    let (mut b, mut hint, irq) = hinting_setup(&ram, HintDiscard::Checked);
    assert_eq!(cmd_id(&b), hint_cmd::STOP);
    let id = b.start_hinting(true).unwrap();
    assert!(id >= hint_cmd::FIRST_RUN);
    assert_eq!(cmd_id(&b), id);
    assert_eq!(irq.config.load(Ordering::SeqCst), 1, "the guest is told");

    // Blocks before the guest's START are not part of the run.
    let block = |i: u64| B_START + i * 4 * MIB;
    for i in 0..3 {
        for p in 0..1024 {
            mem.write_obj(0u8, GuestAddress(block(i) + p * 4096))
                .unwrap();
        }
    }
    hint.add(&[(block(0), 4 * MIB as u32, true)]);
    b.process_queue(2);
    assert_eq!(b.counters().hint_stale, 1);
    assert_eq!(
        resident(&ram, (block(0), 4 * MIB)),
        1024,
        "stale block kept"
    );

    // START, two zeroed blocks (one of which the guest wrote again), STOP.
    send_cmd(mem, &mut hint, id, 0);
    mem.write_obj(0xabu8, GuestAddress(block(2) + 5 * 4096 + 9))
        .unwrap();
    hint.add(&[(block(1), 4 * MIB as u32, true)]);
    hint.add(&[(block(2), 4 * MIB as u32, true)]);
    send_cmd(mem, &mut hint, hint_cmd::STOP, 1);
    assert_eq!(b.process_queue(2), QueueWork::Done);
    assert_eq!(hint.used_count(), 5, "every buffer goes back");
    assert_eq!(resident(&ram, (block(1), 4 * MIB)), 0);
    assert_eq!(
        resident(&ram, (block(2), 4 * MIB)),
        1,
        "the written page stays"
    );
    let v: u8 = mem.read_obj(GuestAddress(block(2) + 5 * 4096 + 9)).unwrap();
    assert_eq!(v, 0xab);
    let c = b.counters();
    assert_eq!((c.hint_runs, c.hint_blocks), (1, 2));
    assert_eq!(c.hint_bytes, 8 * MIB);
    assert_eq!(c.hint_discarded_bytes, 8 * MIB - 4096);
    assert_eq!(c.hint_kept_bytes, 4096);
    // acknowledge_on_stop: DONE, and the guest is told.
    assert_eq!(cmd_id(&b), hint_cmd::DONE);
    assert_eq!(irq.config.load(Ordering::SeqCst), 2);
    let st = b.hint_status().unwrap();
    assert_eq!(st.run.state, HintState::Done);
    assert_eq!(st.guest_cmd, Some(hint_cmd::STOP));
    assert!(st.run.duration.is_some());
}

#[test]
fn unchecked_hinting_discards_written_pages_too() {
    // The naive mode other VMMs ship: it drops the page the guest wrote again.
    let ram = ram();
    let mem = ram.memory();
    let (mut b, mut hint, _irq) = hinting_setup(&ram, HintDiscard::Unchecked);
    let id = b.start_hinting(false).unwrap();
    send_cmd(mem, &mut hint, id, 0);
    mem.write_obj(0xabu8, GuestAddress(B_START + 9)).unwrap();
    hint.add(&[(B_START, 4 * MIB as u32, true)]);
    send_cmd(mem, &mut hint, hint_cmd::STOP, 1);
    b.process_queue(2);
    let v: u8 = mem.read_obj(GuestAddress(B_START + 9)).unwrap();
    assert_eq!(v, 0, "the write is lost");
    assert_eq!(cmd_id(&b), id, "without acknowledge_on_stop the host waits");
    assert_eq!(b.hint_status().unwrap().run.state, HintState::Stopped);
    b.stop_hinting().unwrap();
    assert_eq!(cmd_id(&b), hint_cmd::DONE);
}

#[test]
fn hostile_hint_buffers_are_counted_and_the_queue_keeps_working() {
    let ram = fenced_ram();
    let mem = ram.memory();
    let (mut b, mut hint, _irq) = hinting_setup(&ram, HintDiscard::Checked);
    let id = b.start_hinting(true).unwrap();
    send_cmd(mem, &mut hint, id, 0);
    hint.add(&[(HOLE_START, 4 * MIB as u32, true)]); // in the hole
    hint.add(&[(B_START + 100, 4096, true)]); // unaligned
    hint.add(&[(RAM_END - 4096, 8192, true)]); // past the end
    hint.add(&[(0, !4095, true)]); // huge
    hint.add(&[(CMD_AT, 3, false)]); // a command of the wrong size
    hint.add(&[(B_START, 4 * MIB as u32, true)]); // fine
    assert_eq!(b.process_queue(2), QueueWork::Done);
    let c = b.counters();
    assert_eq!(c.rejected_ranges, 4);
    assert_eq!(c.rejected_descriptors, 1);
    assert_eq!(c.hint_blocks, 1);
    assert_eq!(hint.used_count(), 7);
    // Hinting config writes from the guest are refused; the id is the host's.
    b.write_config(config::FREE_PAGE_HINT_CMD_ID, &7u32.to_le_bytes());
    assert_eq!(cmd_id(&b), id);
    // Without hinting offered the API calls fail.
    let mut plain = new_balloon(options(true, 0), &ram);
    assert!(plain.start_hinting(true).is_err());
    assert!(plain.hint_status().is_err());
    // Checked hinting needs a fenced RAM.
    let unfenced = self::ram();
    let opts = BalloonOptions {
        free_page_hinting: true,
        ..options(true, 0)
    };
    assert!(Balloon::new(opts, &unfenced).is_err());
}

fn backed_ram(backing: Backing) -> GuestRam {
    GuestRam::new(
        &[
            (GuestAddress(0), HOLE_START),
            (GuestAddress(B_START), RAM_END - B_START),
        ],
        RamOptions {
            backing,
            ..RamOptions::default()
        },
    )
    .unwrap()
}

/// Shared memory: inflated pages leave the memfd (a hole punched, not MADV_DONTNEED, which
/// frees nothing there).
#[test]
fn memfd_inflate_punches_holes() {
    let ram = backed_ram(Backing::Memfd);
    let mem = ram.memory();
    let (mut b, mut q, _irq) = basic(&ram);
    let start = B_START + 4 * MIB;
    touch(mem, start, 256);
    let before = ram.allocated_bytes().unwrap();
    let pfns: Vec<u32> = (0..256).map(|i| pfn(start) + i).collect();
    let len = write_pfns(mem, DATA, &pfns);
    q.inflate.add(&[(DATA, len, false)]);
    b.process_queue(0);
    // The used ring's first write takes a page or two of its own.
    let after = ram.allocated_bytes().unwrap();
    assert!(after + MIB <= before + 8192, "{before} -> {after}");
    assert_eq!(resident(&ram, (start, MIB)), 0);
    assert_eq!(b.counters().inflate_discarded_bytes, MIB);
}

/// Hugetlb: a 2 MiB host page goes back once all 512 of its balloon pages are in the
/// balloon (and again after a deflate of one of them and its inflate); reports give back
/// whole huge pages and count the rest as kept. One RAM for the whole test (guest RAM is
/// never unmapped, and its huge pages stay taken until the process ends).
#[test]
fn hugetlb_inflate_waits_for_whole_huge_pages() {
    let Some(_lease) = HugePageLease::take(RAM_BYTES / (2 * MIB)) else {
        eprintln!("SKIPPED: 16 free 2 MiB huge pages are needed (run as root)");
        return;
    };
    let ram = backed_ram(Backing::Hugetlb);
    let mem = ram.memory();
    let (mut b, mut q, _irq) = basic(&ram);
    let huge = B_START + 4 * MIB;
    touch(mem, huge, 512);
    touch(mem, huge + 2 * MIB, 512);
    let held = || ram.allocated_bytes().unwrap();
    let before = held();
    let inflate = |pfns: Vec<u32>, q: &mut Setup<'_>, b: &mut Balloon| {
        for chunk in pfns.chunks(256) {
            let len = write_pfns(mem, DATA, chunk);
            q.inflate.add(&[(DATA, len, false)]);
            b.process_queue(0);
        }
    };
    // 511 pages of the huge page, and half of the next: nothing whole yet.
    inflate((1..512).map(|i| pfn(huge) + i).collect(), &mut q, &mut b);
    inflate((512..768).map(|i| pfn(huge) + i).collect(), &mut q, &mut b);
    assert_eq!(held(), before);
    assert_eq!(b.counters().inflate_discarded_bytes, 0);
    assert_eq!(b.held_pages(), 511 + 256);
    // The last one completes it.
    inflate(vec![pfn(huge)], &mut q, &mut b);
    assert_eq!(held(), before - 2 * MIB);
    assert_eq!(b.counters().inflate_discarded_bytes, 2 * MIB);
    // A deflated page: the guest uses it (the whole huge page comes back); inflated
    // again, the huge page is whole in the balloon and goes once more.
    let len = write_pfns(mem, DATA, &[pfn(huge) + 7]);
    q.deflate.add(&[(DATA, len, false)]);
    b.process_queue(1);
    touch(mem, huge + 7 * 4096, 1);
    assert_eq!(held(), before);
    inflate(vec![pfn(huge) + 7], &mut q, &mut b);
    assert_eq!(held(), before - 2 * MIB);
    assert_eq!(b.counters().inflate_discarded_bytes, 4 * MIB);
    // Repeats complete nothing new.
    inflate(vec![pfn(huge) + 7, pfn(huge) + 600], &mut q, &mut b);
    assert_eq!(b.counters().inflate_discarded_bytes, 4 * MIB);

    // Reporting on the same RAM: a whole 4 MiB range goes; of a range 4 KiB into a huge
    // page, only the whole huge page inside it does.
    drop(b);
    let (mut b, mut report, _irq) = reporting_setup(&ram);
    let at = B_START + 8 * MIB;
    touch(mem, at, 2048);
    let before = held();
    report.add(&[
        (at, 4 * MIB as u32, true),
        (at + 4 * MIB + 4096, (4 * MIB - 4096) as u32, true),
    ]);
    b.process_queue(2);
    let c = b.counters();
    assert_eq!(c.reported_discarded_bytes, 6 * MIB);
    assert_eq!(c.unaligned_kept_bytes, 2 * MIB - 4096);
    assert_eq!(held(), before - 6 * MIB);
}
