//! The balloon behind the virtio-mmio transport, driven by a fuzzed guest: register
//! reads and writes, guest memory writes, descriptor chains and queue kicks decoded from
//! the input. Oracles: no panic, no discard outside guest RAM (the madvise interposer),
//! and libFuzzer's -rss_limit_mb / -timeout for unbounded memory or work.
#![no_main]

use std::sync::Arc;

use ebb_balloon::{Balloon, BalloonOptions};
use ebb_devices::bus::BusDevice;
use ebb_devices::virtio::mmio::MmioTransport;
use ebb_devices::virtio::{MmioInterrupt, QueueWork, VirtioDevice};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

ebb_fuzz::madvise_oracle!();

const STATUS: u64 = 0x70;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const QUEUE_DESC_LOW: u64 = 0x80;
const QUEUE_AVAIL_LOW: u64 = 0x90;
const QUEUE_USED_LOW: u64 = 0xa0;
const CONFIG: u64 = 0x100;
const QUEUES: usize = 5;
/// Guest-physical span the fuzzer may write (RAM, the hole and a little past the end).
const SPAN: u64 = 13 << 20;

/// Reads the input a few bytes at a time; runs out as zeros.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

/// The fuzzed driver's view of one queue.
#[derive(Default, Clone, Copy)]
struct DriverQueue {
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

fn base(q: usize) -> u64 {
    0x10_0000 + (q as u64) * 0x4000
}

fn write32(t: &mut MmioTransport<Balloon>, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn handshake(t: &mut MmioTransport<Balloon>, input: &mut Input, driver: &mut [DriverQueue]) {
    write32(t, STATUS, 0);
    write32(t, STATUS, 1 | 2);
    let features = input.u64() | (1 << 32);
    write32(t, DRIVER_FEATURES_SEL, 0);
    write32(t, DRIVER_FEATURES, features as u32);
    write32(t, DRIVER_FEATURES_SEL, 1);
    write32(t, DRIVER_FEATURES, (features >> 32) as u32);
    write32(t, STATUS, 1 | 2 | 8);
    let ready = input.u8();
    let size = 1u16 << (input.u8() % 8).max(1);
    for (q, d) in driver.iter_mut().enumerate() {
        *d = DriverQueue::default();
        if ready & (1 << q) == 0 {
            continue;
        }
        write32(t, QUEUE_SEL, q as u32);
        write32(t, QUEUE_NUM, u32::from(size));
        write32(t, QUEUE_DESC_LOW, base(q) as u32);
        write32(t, QUEUE_AVAIL_LOW, (base(q) + 0x1000) as u32);
        write32(t, QUEUE_USED_LOW, (base(q) + 0x2000) as u32);
        write32(t, QUEUE_READY, 1);
        d.size = size;
    }
    write32(t, STATUS, 1 | 2 | 8 | 4);
}

fn add_chain(ram: &ebb_devices::ram::GuestRam, input: &mut Input, driver: &mut [DriverQueue]) {
    let q = usize::from(input.u8()) % QUEUES;
    let d = &mut driver[q];
    if d.size == 0 {
        return;
    }
    let mem = ram.memory();
    let count = 1 + input.u8() % 4;
    let head = d.next_desc;
    for i in 0..count {
        let index = (head + u16::from(i)) % d.size;
        let addr = u64::from(input.u32()) % SPAN;
        let len = input.u32() % (1 << 16);
        let mut flags = input.u16() & 0b111;
        let next = (index + 1) % d.size;
        if i + 1 < count {
            flags |= 1;
        } else {
            flags &= !1;
        }
        let at = GuestAddress(base(q) + u64::from(index) * 16);
        let _ = mem.write_obj(addr, at);
        let _ = mem.write_obj(len, GuestAddress(at.0 + 8));
        let _ = mem.write_obj(flags, GuestAddress(at.0 + 12));
        let _ = mem.write_obj(next, GuestAddress(at.0 + 14));
    }
    d.next_desc = (head + u16::from(count)) % d.size;
    let avail = base(q) + 0x1000;
    let slot = GuestAddress(avail + 4 + 2 * u64::from(d.avail_idx % d.size));
    let _ = mem.write_obj(head, slot);
    d.avail_idx = d.avail_idx.wrapping_add(1);
    let _ = mem.write_obj(d.avail_idx, GuestAddress(avail + 2));
}

fn kick(t: &mut MmioTransport<Balloon>, q: u16) {
    if !t.is_activated() {
        return;
    }
    // What the event loop does: passes until the device has no more work (bounded here
    // as the event loop is, by coming back later).
    for _ in 0..16 {
        if t.device_mut().process_queue(q) == QueueWork::Done {
            break;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let ram = ebb_fuzz::small_ram();
    ebb_fuzz::guard_discards(&ram);
    let flags = input.u8();
    let options = BalloonOptions {
        target_pages: input.u16().into(),
        deflate_on_oom: flags & 1 != 0,
        free_page_reporting: flags & 2 != 0,
        stats_interval_s: u32::from(flags >> 2 & 3),
        free_page_hinting: flags & 16 != 0,
        // The fuzzer's RAM has no write fence; the madvise guard checks every discard.
        hint_discard: ebb_balloon::queues::hinting::HintDiscard::Unchecked,
        deflate_prefault: true,
    };
    let Ok(balloon) = Balloon::new(options, &ram) else {
        return;
    };
    let irq = ebb_devices::new_eventfd().expect("eventfd");
    let interrupt = Arc::new(MmioInterrupt::new(irq));
    let Ok(mut t) = MmioTransport::new(balloon, ram.clone(), interrupt) else {
        return;
    };
    let mut driver = [DriverQueue::default(); QUEUES];
    let mut steps = 0;
    while !input.0.is_empty() && steps < 256 {
        steps += 1;
        match input.u8() % 8 {
            0 => {
                let offset = u64::from(input.u16() % 0x200);
                let width = [1, 2, 4, 8][usize::from(input.u8() % 4)];
                let value = input.u64().to_le_bytes();
                t.write(offset, &value[..width]);
            }
            1 => {
                let offset = u64::from(input.u16() % 0x200);
                let mut data = [0u8; 8];
                let width = [1, 2, 4, 8][usize::from(input.u8() % 4)];
                t.read(offset, &mut data[..width]);
            }
            2 => {
                let addr = u64::from(input.u32()) % SPAN;
                let len = usize::from(input.u8());
                let bytes: Vec<u8> = (0..len).map(|_| input.u8()).collect();
                let _ = ram.memory().write_slice(&bytes, GuestAddress(addr));
            }
            3 => handshake(&mut t, &mut input, &mut driver),
            4 => add_chain(&ram, &mut input, &mut driver),
            5 => {
                let q = u16::from(input.u8()) % QUEUES as u16;
                kick(&mut t, q);
            }
            6 => t.device_mut().process_event(0),
            _ => {
                let offset = CONFIG + u64::from(input.u8() % 0x20);
                let value = input.u32().to_le_bytes();
                t.write(offset, &value);
            }
        }
    }
});
