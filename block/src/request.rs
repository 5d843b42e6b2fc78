//! The one validation pass: a descriptor chain becomes a [`Request`] Ebb may execute, or
//! the status to answer it with and the reason it was refused.
//!
//! Framing: the header alone in the first descriptor (device-readable, 16 bytes), the
//! status alone in the last (device-writable, 1 byte), the data buffers in between, each
//! in the direction the request needs. That is how every Linux driver (and the spec's own
//! examples) lays requests out; the spec also lets drivers merge them freely, which Ebb
//! does not follow: anything else is answered IOERR and counted.
//!
//! Everything the guest sends is hostile: the walk reads at most [`QUEUE_SIZE`]
//! descriptors, keeps at most [`SEG_MAX`] buffers and [`MAX_SEGMENTS`] ranges (in
//! buffers allocated once, never grown), checks every buffer lies in one region of guest
//! RAM, and every sector range with checked arithmetic against the image's size. A
//! request is refused as a whole, before anything is read or written.

use ebb_devices::ram::{GuestRam, RamBuffer};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::counters::{Op, Reject};
use crate::protocol::{
    features, request_type, status, HEADER_LEN, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, QUEUE_SIZE, SECTOR_SHIFT, SECTOR_SIZE,
    SEGMENT_LEN, SEG_MAX, SIZE_MAX, WRITE_ZEROES_FLAG_UNMAP,
};

/// Most ranges one discard or write-zeroes request may carry.
pub const MAX_SEGMENTS: usize = if MAX_DISCARD_SEG > MAX_WRITE_ZEROES_SEG {
    MAX_DISCARD_SEG as usize
} else {
    MAX_WRITE_ZEROES_SEG as usize
};

/// What a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskShape {
    /// Size of the image in bytes (a multiple of 512).
    pub size: u64,
    /// The disk is read-only.
    pub readonly: bool,
    /// Features the driver accepted.
    pub negotiated: u64,
}

/// A checked discard or write-zeroes range, in bytes of the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// Start.
    pub offset: u64,
    /// Length (0 for an empty segment, which does nothing).
    pub len: u64,
    /// The guest allows deallocation (write-zeroes UNMAP flag).
    pub unmap: bool,
}

/// The buffers a request's data lives in, reused from request to request: their
/// capacities are fixed when the queue is set up and never grow.
#[derive(Debug)]
pub struct Scratch {
    /// Data buffers in guest RAM, in chain order (at most [`SEG_MAX`]).
    pub buffers: Vec<RamBuffer>,
    /// Discard or write-zeroes ranges (at most [`MAX_SEGMENTS`]).
    pub ranges: Vec<ByteRange>,
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            buffers: Vec::with_capacity(SEG_MAX as usize),
            ranges: Vec::with_capacity(MAX_SEGMENTS),
        }
    }
}

impl Scratch {
    fn clear(&mut self) {
        self.buffers.clear();
        self.ranges.clear();
    }
}

/// A request that passed every check. Its buffers or ranges are in the [`Scratch`] it
/// was parsed into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub op: Op,
    /// Byte offset in the image (reads and writes; 0 otherwise).
    pub offset: u64,
    /// Bytes of data (reads, writes, GET_ID's buffer) or of ranges (discard and
    /// write-zeroes).
    pub len: u64,
}

/// What the validation pass made of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// No usable status descriptor: nothing can be answered, nothing is done; the chain
    /// goes back with used length 0.
    NoStatus,
    /// Refused: answer `status` (IOERR or UNSUPP) at `status_at`.
    Refused {
        /// Where the status byte goes.
        status_at: GuestAddress,
        /// IOERR or UNSUPP.
        status: u8,
        /// Why.
        reason: Reject,
    },
    /// To execute; the status byte goes at `status_at`.
    Ready {
        /// Where the status byte goes.
        status_at: GuestAddress,
        /// The request.
        request: Request,
    },
}

/// Which way the data buffers of a request must point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DataWay {
    /// The device writes them (IN, GET_ID).
    DeviceWrites,
    /// The device reads them (OUT, DISCARD, WRITE_ZEROES).
    DeviceReads,
    /// There are none (FLUSH).
    None,
}

fn data_way(op: Op) -> DataWay {
    match op {
        Op::Read | Op::GetId => DataWay::DeviceWrites,
        Op::Write | Op::Discard | Op::WriteZeroes => DataWay::DeviceReads,
        Op::Flush => DataWay::None,
    }
}

/// The request type and sector from the header descriptor, if it is one.
fn read_header(ram: &GuestRam, desc: &Descriptor) -> Option<(u32, u64)> {
    if desc.is_write_only() || desc.len() != HEADER_LEN {
        return None;
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    ram.memory().read_slice(&mut raw, desc.addr()).ok()?;
    let kind = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[8..16]);
    Some((kind, u64::from_le_bytes(sector)))
}

/// The operation a request type asks for, if Ebb does it with these features.
fn operation(kind: u32, negotiated: u64) -> Option<Op> {
    match kind {
        request_type::IN => Some(Op::Read),
        request_type::OUT => Some(Op::Write),
        request_type::FLUSH => Some(Op::Flush),
        request_type::GET_ID => Some(Op::GetId),
        request_type::DISCARD if negotiated & features::DISCARD != 0 => Some(Op::Discard),
        request_type::WRITE_ZEROES if negotiated & features::WRITE_ZEROES != 0 => {
            Some(Op::WriteZeroes)
        }
        _ => None,
    }
}

/// Checks one chain (its descriptors in order) against guest RAM and the disk; fills
/// `scratch` with the buffers and ranges of a [`Parsed::Ready`] request.
pub fn parse(
    descriptors: impl IntoIterator<Item = Descriptor>,
    ram: &GuestRam,
    disk: &DiskShape,
    scratch: &mut Scratch,
) -> Parsed {
    scratch.clear();
    // A chain is at most a ring long; stop reading a longer one here.
    let mut descs = descriptors.into_iter().take(usize::from(QUEUE_SIZE));
    let Some(first) = descs.next() else {
        return Parsed::NoStatus;
    };
    let header = read_header(ram, &first);
    let op = header.and_then(|(kind, _)| operation(kind, disk.negotiated));
    // Buffers are checked as the walk goes: the first problem is kept, the walk goes on
    // to find the status descriptor (the last one).
    let mut problem = None;
    let mut data_len = 0u64;
    let mut count = 0u32;
    let mut last: Option<Descriptor> = None;
    for desc in descs {
        let Some(data) = last.replace(desc) else {
            continue;
        };
        count += 1;
        let Some(op) = op else {
            continue; // a refused header or type: its data does not matter
        };
        if problem.is_some() {
            continue;
        }
        let way = data_way(op);
        let writable = data.is_write_only();
        problem = match way {
            DataWay::None => Some(Reject::Length),
            DataWay::DeviceWrites if !writable => Some(Reject::Direction),
            DataWay::DeviceReads if writable => Some(Reject::Direction),
            _ if count > SEG_MAX || data.len() > SIZE_MAX => Some(Reject::Buffer),
            _ => match ram.buffer(data.addr().0, u64::from(data.len())) {
                Some(buffer) => {
                    // count <= SEG_MAX: within the scratch capacity.
                    scratch.buffers.push(buffer);
                    data_len += buffer.len() as u64;
                    None
                }
                None => Some(Reject::Buffer),
            },
        };
    }
    let status_at = match last {
        Some(s) if s.is_write_only() && s.len() == 1 && ram.buffer(s.addr().0, 1).is_some() => {
            s.addr()
        }
        _ => return Parsed::NoStatus,
    };
    let refuse = |status, reason| Parsed::Refused {
        status_at,
        status,
        reason,
    };
    let Some((_, sector)) = header else {
        return refuse(status::IOERR, Reject::Header);
    };
    let Some(op) = op else {
        return refuse(status::UNSUPP, Reject::Unsupported);
    };
    if op.writes() && disk.readonly {
        return refuse(status::IOERR, Reject::ReadOnly);
    }
    if let Some(reason) = problem {
        return refuse(status::IOERR, reason);
    }
    let mut request = Request {
        op,
        offset: 0,
        len: data_len,
    };
    match op {
        Op::Read | Op::Write => {
            if data_len == 0 || data_len % SECTOR_SIZE != 0 {
                return refuse(status::IOERR, Reject::Length);
            }
            match sector_range(sector, data_len, disk.size) {
                Some(offset) => request.offset = offset,
                None => return refuse(status::IOERR, Reject::Range),
            }
        }
        Op::GetId if data_len == 0 => return refuse(status::IOERR, Reject::Length),
        Op::GetId | Op::Flush => {}
        Op::Discard | Op::WriteZeroes => match segments(ram, op, disk, scratch) {
            Ok(len) => request.len = len,
            Err((status, reason)) => return refuse(status, reason),
        },
    }
    Parsed::Ready { status_at, request }
}

/// The byte offset of `len` bytes from `sector`, if they lie inside an image of `size`
/// bytes (no arithmetic overflows).
fn sector_range(sector: u64, len: u64, size: u64) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= size).then_some(offset)
}

/// Reads and checks the segments of a discard or write-zeroes request from
/// `scratch.buffers` into `scratch.ranges`; returns their total bytes.
fn segments(
    ram: &GuestRam,
    op: Op,
    disk: &DiskShape,
    scratch: &mut Scratch,
) -> Result<u64, (u8, Reject)> {
    let (max_segments, max_sectors, allowed_flags) = match op {
        Op::Discard => (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS, 0),
        _ => (
            MAX_WRITE_ZEROES_SEG,
            MAX_WRITE_ZEROES_SECTORS,
            WRITE_ZEROES_FLAG_UNMAP,
        ),
    };
    let seg = u64::from(SEGMENT_LEN);
    let data_len: u64 = scratch.buffers.iter().map(|b| b.len() as u64).sum();
    if data_len == 0 || scratch.buffers.iter().any(|b| b.len() as u64 % seg != 0) {
        return Err((status::IOERR, Reject::Length));
    }
    if data_len / seg > u64::from(max_segments) {
        return Err((status::IOERR, Reject::Segment));
    }
    let mut total = 0u64;
    for buffer in &scratch.buffers {
        for i in 0..buffer.len() as u64 / seg {
            let mut raw = [0u8; SEGMENT_LEN as usize];
            let at = GuestAddress(buffer.gpa() + i * seg);
            if ram.memory().read_slice(&mut raw, at).is_err() {
                return Err((status::IOERR, Reject::Buffer));
            }
            let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
            if flags & !allowed_flags != 0 {
                // Unknown flags, or UNMAP on a discard: the spec's answer is UNSUPP.
                return Err((status::UNSUPP, Reject::Segment));
            }
            if sectors > max_sectors {
                return Err((status::IOERR, Reject::Segment));
            }
            let len = u64::from(sectors) << SECTOR_SHIFT;
            let Some(offset) = sector_range(sector, len, disk.size) else {
                return Err((status::IOERR, Reject::Range));
            };
            // At most MAX_SEGMENTS (checked above): within the scratch capacity.
            scratch.ranges.push(ByteRange {
                offset,
                len,
                unmap: flags & WRITE_ZEROES_FLAG_UNMAP != 0,
            });
            total += len;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ebb_devices::ram::RamOptions;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;

    const MIB: u64 = 1 << 20;
    const DISK: u64 = MIB;

    /// Region A [0, 1 MiB), a hole, region B [2 MiB, 3 MiB).
    fn ram() -> GuestRam {
        GuestRam::new(
            &[(GuestAddress(0), MIB), (GuestAddress(2 * MIB), MIB)],
            RamOptions::default(),
        )
        .unwrap()
    }

    fn shape() -> DiskShape {
        DiskShape {
            size: DISK,
            readonly: false,
            negotiated: features::DISCARD | features::WRITE_ZEROES | features::FLUSH,
        }
    }

    fn out(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    fn inn(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0)
    }

    fn header(ram: &GuestRam, at: u64, kind: u32, sector: u64) -> Descriptor {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        ram.memory().write_slice(&h, GuestAddress(at)).unwrap();
        out(at, 16)
    }

    fn segment(ram: &GuestRam, at: u64, sector: u64, sectors: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        ram.memory().write_slice(&s, GuestAddress(at)).unwrap();
    }

    const STATUS: u64 = 0x100;

    fn run(ram: &GuestRam, descs: Vec<Descriptor>, disk: &DiskShape) -> Parsed {
        parse(descs, ram, disk, &mut Scratch::default())
    }

    fn refused(p: Parsed) -> (u8, Reject) {
        match p {
            Parsed::Refused { status, reason, .. } => (status, reason),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_good_read_and_write() {
        let m = ram();
        let mut s = Scratch::default();
        let h = header(&m, 0x0, request_type::IN, 8);
        let p = parse(
            vec![h, inn(0x1000, 512), inn(2 * MIB, 1024), inn(STATUS, 1)],
            &m,
            &shape(),
            &mut s,
        );
        assert_eq!(
            p,
            Parsed::Ready {
                status_at: GuestAddress(STATUS),
                request: Request {
                    op: Op::Read,
                    offset: 4096,
                    len: 1536
                }
            }
        );
        assert_eq!(s.buffers.len(), 2);
        assert_eq!(s.buffers[1].gpa(), 2 * MIB);
        let h = header(&m, 0x0, request_type::OUT, 0);
        let p = run(&m, vec![h, out(0x1000, 512), inn(STATUS, 1)], &shape());
        assert!(matches!(
            p,
            Parsed::Ready {
                request: Request { op: Op::Write, .. },
                ..
            }
        ));
    }

    #[test]
    fn without_a_usable_status_nothing_is_answered() {
        let m = ram();
        let h = header(&m, 0x0, request_type::IN, 0);
        for descs in [
            vec![],
            vec![h],
            vec![h, inn(0x1000, 512)], // data last: 512 bytes, not 1
            vec![h, inn(0x1000, 512), out(STATUS, 1)], // read-only status
            vec![h, inn(0x1000, 512), inn(MIB + 5, 1)], // in the hole
            vec![h, inn(0x1000, 512), inn(STATUS, 0)],
        ] {
            assert_eq!(
                run(&m, descs.clone(), &shape()),
                Parsed::NoStatus,
                "{descs:?}"
            );
        }
    }

    #[test]
    fn hostile_requests_get_the_right_status() {
        let m = ram();
        // Each header in its own slot: the cases are all built before any runs.
        let slot = std::cell::Cell::new(0x8000u64);
        let hdr = |kind, sector| {
            slot.set(slot.get() + 16);
            header(&m, slot.get(), kind, sector)
        };
        let rd = |sector| hdr(request_type::IN, sector);
        let st = inn(STATUS, 1);
        let size_max = SIZE_MAX;
        let cases: Vec<(&str, Vec<Descriptor>, (u8, Reject))> = vec![
            (
                "writable header",
                vec![inn(0x0, 16), inn(0x1000, 512), st],
                (status::IOERR, Reject::Header),
            ),
            (
                "short header",
                vec![out(0x0, 8), inn(0x1000, 512), st],
                (status::IOERR, Reject::Header),
            ),
            (
                "header outside RAM",
                vec![out(MIB + 64, 16), inn(0x1000, 512), st],
                (status::IOERR, Reject::Header),
            ),
            (
                "unknown type",
                vec![hdr(99, 0), st],
                (status::UNSUPP, Reject::Unsupported),
            ),
            (
                "read into a readable buffer",
                vec![rd(0), out(0x1000, 512), st],
                (status::IOERR, Reject::Direction),
            ),
            (
                "empty read",
                vec![rd(0), st],
                (status::IOERR, Reject::Length),
            ),
            (
                "part of a sector",
                vec![rd(0), inn(0x1000, 100), st],
                (status::IOERR, Reject::Length),
            ),
            (
                "zero-length buffer",
                vec![rd(0), inn(0x1000, 0), st],
                (status::IOERR, Reject::Buffer),
            ),
            (
                "buffer across the hole",
                vec![rd(0), inn(MIB - 512, 1024), st],
                (status::IOERR, Reject::Buffer),
            ),
            (
                "buffer past RAM",
                vec![rd(0), inn(3 * MIB - 512, 1024), st],
                (status::IOERR, Reject::Buffer),
            ),
            (
                "buffer over size_max",
                vec![rd(0), inn(0x1000, size_max + 512), st],
                (status::IOERR, Reject::Buffer),
            ),
            (
                "last sector plus one",
                vec![rd(DISK / 512 - 1), inn(0x1000, 1024), st],
                (status::IOERR, Reject::Range),
            ),
            (
                "past the end",
                vec![rd(DISK / 512), inn(0x1000, 512), st],
                (status::IOERR, Reject::Range),
            ),
            (
                "sector * 512 overflows",
                vec![rd(u64::MAX / 256), inn(0x1000, 512), st],
                (status::IOERR, Reject::Range),
            ),
            (
                "offset + len overflows",
                vec![rd((u64::MAX >> 9) - 1), inn(0x1000, 4096), st],
                (status::IOERR, Reject::Range),
            ),
            (
                "data on a flush",
                vec![hdr(request_type::FLUSH, 0), out(0x1000, 512), st],
                (status::IOERR, Reject::Length),
            ),
            (
                "get_id without a buffer",
                vec![hdr(request_type::GET_ID, 0), st],
                (status::IOERR, Reject::Length),
            ),
            (
                "get_id into a readable buffer",
                vec![hdr(request_type::GET_ID, 0), out(0x1000, 20), st],
                (status::IOERR, Reject::Direction),
            ),
        ];
        for (what, descs, expected) in cases {
            assert_eq!(refused(run(&m, descs, &shape())), expected, "{what}");
        }
        // More buffers than seg_max.
        let mut descs = vec![rd(0)];
        descs.extend((0..=SEG_MAX).map(|i| inn(0x1000 + u64::from(i) * 512, 512)));
        descs.push(st);
        assert_eq!(
            refused(run(&m, descs, &shape())),
            (status::IOERR, Reject::Buffer)
        );
        // The last sector exactly is fine.
        let p = run(&m, vec![rd(DISK / 512 - 1), inn(0x1000, 512), st], &shape());
        assert!(matches!(p, Parsed::Ready { .. }), "{p:?}");
    }

    #[test]
    fn read_only_disks_refuse_writes_only() {
        let m = ram();
        let ro = DiskShape {
            readonly: true,
            ..shape()
        };
        let st = inn(STATUS, 1);
        for kind in [
            request_type::OUT,
            request_type::DISCARD,
            request_type::WRITE_ZEROES,
        ] {
            segment(&m, 0x1000, 0, 8, 0);
            let p = run(&m, vec![header(&m, 0x0, kind, 0), out(0x1000, 16), st], &ro);
            assert_eq!(refused(p), (status::IOERR, Reject::ReadOnly), "type {kind}");
        }
        let p = run(
            &m,
            vec![header(&m, 0x0, request_type::IN, 0), inn(0x1000, 512), st],
            &ro,
        );
        assert!(matches!(p, Parsed::Ready { .. }));
        let p = run(&m, vec![header(&m, 0x0, request_type::FLUSH, 0), st], &ro);
        assert!(matches!(p, Parsed::Ready { .. }));
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let m = ram();
        let mut s = Scratch::default();
        let st = inn(STATUS, 1);
        let dis = header(&m, 0x0, request_type::DISCARD, 0);
        let wz = header(&m, 0x20, request_type::WRITE_ZEROES, 0);
        segment(&m, 0x1000, 8, 16, 0);
        segment(&m, 0x1010, 100, 8, 0);
        let p = parse(vec![dis, out(0x1000, 32), st], &m, &shape(), &mut s);
        assert!(
            matches!(
                p,
                Parsed::Ready {
                    request: Request {
                        op: Op::Discard,
                        len: 12288,
                        ..
                    },
                    ..
                }
            ),
            "{p:?}"
        );
        assert_eq!(
            s.ranges,
            [
                ByteRange {
                    offset: 4096,
                    len: 8192,
                    unmap: false
                },
                ByteRange {
                    offset: 51200,
                    len: 4096,
                    unmap: false
                }
            ]
        );
        segment(&m, 0x1000, 8, 16, WRITE_ZEROES_FLAG_UNMAP);
        let p = parse(vec![wz, out(0x1000, 16), st], &m, &shape(), &mut s);
        assert!(matches!(
            p,
            Parsed::Ready {
                request: Request {
                    op: Op::WriteZeroes,
                    ..
                },
                ..
            }
        ));
        assert!(s.ranges[0].unmap);

        // (what, header, segment (sector, sectors, flags), payload bytes, expected)
        type Case<'a> = (&'a str, Descriptor, (u64, u32, u32), u32, (u8, Reject));
        let cases: Vec<Case> = vec![
            (
                "unmap on a discard",
                dis,
                (0, 8, WRITE_ZEROES_FLAG_UNMAP),
                16,
                (status::UNSUPP, Reject::Segment),
            ),
            (
                "unknown discard flag",
                dis,
                (0, 8, 4),
                16,
                (status::UNSUPP, Reject::Segment),
            ),
            (
                "unknown write-zeroes flag",
                wz,
                (0, 8, 3),
                16,
                (status::UNSUPP, Reject::Segment),
            ),
            (
                "past the end",
                dis,
                (DISK / 512 - 4, 8, 0),
                16,
                (status::IOERR, Reject::Range),
            ),
            (
                "overflowing sector",
                dis,
                (u64::MAX, 1, 0),
                16,
                (status::IOERR, Reject::Range),
            ),
            (
                "over max_discard_sectors",
                dis,
                (0, MAX_DISCARD_SECTORS + 1, 0),
                16,
                (status::IOERR, Reject::Segment),
            ),
            (
                "over max_write_zeroes_sectors",
                wz,
                (0, MAX_WRITE_ZEROES_SECTORS + 1, 0),
                16,
                (status::IOERR, Reject::Segment),
            ),
            (
                "two write-zeroes segments",
                wz,
                (0, 8, 0),
                32,
                (status::IOERR, Reject::Segment),
            ),
            (
                "half a segment",
                dis,
                (0, 8, 0),
                8,
                (status::IOERR, Reject::Length),
            ),
        ];
        for (what, h, (sector, sectors, flags), len, expected) in cases {
            segment(&m, 0x1000, sector, sectors, flags);
            segment(&m, 0x1010, 0, 8, 0);
            let p = run(&m, vec![h, out(0x1000, len), st], &shape());
            assert_eq!(refused(p), expected, "{what}");
        }
        // Too many discard segments.
        let n = MAX_DISCARD_SEG + 1;
        for i in 0..n {
            segment(&m, 0x2000 + u64::from(i) * 16, 0, 8, 0);
        }
        let p = run(&m, vec![dis, out(0x2000, n * 16), st], &shape());
        assert_eq!(refused(p), (status::IOERR, Reject::Segment));
        // Not negotiated: unsupported.
        let plain = DiskShape {
            negotiated: 0,
            ..shape()
        };
        segment(&m, 0x1000, 0, 8, 0);
        for h in [dis, wz] {
            let p = run(&m, vec![h, out(0x1000, 16), st], &plain);
            assert_eq!(refused(p), (status::UNSUPP, Reject::Unsupported));
        }
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Addresses around the edges of guest RAM and the hole, and anywhere.
        fn address() -> impl Strategy<Value = u64> {
            prop_oneof![
                0u64..4096,
                MIB - 600..MIB + 600,
                2 * MIB - 600..2 * MIB + 600,
                3 * MIB - 600..3 * MIB + 600,
                any::<u64>(),
                Just(u64::MAX - 15),
            ]
        }

        fn length() -> impl Strategy<Value = u32> {
            prop_oneof![
                Just(0u32),
                Just(1),
                Just(16),
                Just(512),
                1u32..2048,
                Just(SIZE_MAX),
                Just(SIZE_MAX + 1),
                any::<u32>(),
            ]
        }

        fn sector() -> impl Strategy<Value = u64> {
            prop_oneof![
                0u64..(DISK / 512 + 8),
                Just(u64::MAX),
                Just(u64::MAX >> 9),
                (u64::MAX >> 9) - 8..=(u64::MAX >> 9),
                any::<u64>(),
            ]
        }

        fn kind() -> impl Strategy<Value = u32> {
            prop_oneof![
                Just(request_type::IN),
                Just(request_type::OUT),
                Just(request_type::FLUSH),
                Just(request_type::GET_ID),
                Just(request_type::DISCARD),
                Just(request_type::WRITE_ZEROES),
                any::<u32>(),
            ]
        }

        /// A data buffer: mostly good ones (inside RAM, whole sectors, the direction the
        /// request wants: `None`), sometimes anything.
        fn buffer() -> impl Strategy<Value = (u64, u32, Option<bool>)> {
            let good = (
                prop_oneof![0x4000u64..0x8000, 2 * MIB..2 * MIB + 0x1000],
                prop_oneof![Just(512u32), Just(1024), Just(4096)],
                Just(None),
            );
            let any_buffer = (address(), length(), any::<bool>().prop_map(Some));
            prop_oneof![4 => good, 1 => any_buffer]
        }

        /// A discard/write-zeroes segment: mostly plausible, sometimes anything.
        fn range() -> impl Strategy<Value = (u64, u32, u32)> {
            prop_oneof![
                3 => (0u64..DISK / 512, 0u32..64, 0u32..2),
                1 => (sector(), any::<u32>(), any::<u32>()),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]

            /// Whatever the chain, a request Ebb would execute stays inside the image and
            /// guest RAM, within the advertised limits, in the right direction.
            #[test]
            fn ready_requests_stay_inside_the_image_and_ram(
                kind in kind(),
                sector in prop_oneof![3 => 0u64..DISK / 512, 1 => sector()],
                bad_header in prop_oneof![4 => Just(None), 1 => (any::<bool>(), length()).prop_map(Some)],
                data in proptest::collection::vec(buffer(), 0..6),
                bad_status in prop_oneof![4 => Just(None), 1 => (address(), length(), any::<bool>()).prop_map(Some)],
                segments in prop_oneof![
                    Just(Vec::new()),
                    proptest::collection::vec(range(), 1..4),
                ],
                readonly in any::<bool>(),
            ) {
                let m = ram();
                let flag = |write: bool| if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                let mut descs = vec![match bad_header {
                    None => header(&m, 0x0, kind, sector),
                    Some((write, len)) => Descriptor::new(0, len, flag(write), 0),
                }];
                let device_writes = kind == request_type::IN || kind == request_type::GET_ID;
                for (addr, len, write) in &data {
                    descs.push(Descriptor::new(*addr, *len, flag(write.unwrap_or(device_writes)), 0));
                }
                // A discard/write-zeroes payload, if any.
                for (i, (s, n, f)) in segments.iter().enumerate() {
                    segment(&m, 0x1000 + i as u64 * 16, *s, *n, *f);
                }
                if !segments.is_empty() {
                    descs.push(out(0x1000, segments.len() as u32 * 16));
                }
                descs.push(match bad_status {
                    None => inn(STATUS, 1),
                    Some((addr, len, write)) => Descriptor::new(addr, len, flag(write), 0),
                });
                let disk = DiskShape { readonly, ..shape() };
                let mut s = Scratch::default();
                let parsed = parse(descs, &m, &disk, &mut s);
                prop_assert!(s.buffers.capacity() <= SEG_MAX as usize * 2);
                prop_assert!(s.ranges.capacity() <= MAX_SEGMENTS * 2);
                let (status_at, request) = match parsed {
                    Parsed::NoStatus => return Ok(()),
                    Parsed::Refused { status_at, status, .. } => {
                        prop_assert!(status == status::IOERR || status == status::UNSUPP);
                        prop_assert!(m.buffer(status_at.0, 1).is_some());
                        return Ok(());
                    }
                    Parsed::Ready { status_at, request } => (status_at, request),
                };
                prop_assert!(m.buffer(status_at.0, 1).is_some());
                prop_assert!(!(readonly && request.op.writes()));
                prop_assert!(s.buffers.len() <= SEG_MAX as usize);
                for b in &s.buffers {
                    prop_assert_eq!(m.buffer(b.gpa(), b.len() as u64), Some(*b));
                    prop_assert!(b.len() as u32 <= SIZE_MAX);
                }
                let total: u64 = s.buffers.iter().map(|b| b.len() as u64).sum();
                match request.op {
                    Op::Read | Op::Write => {
                        prop_assert_eq!(request.len, total);
                        prop_assert!(total > 0 && total % 512 == 0);
                        prop_assert!(request.offset % 512 == 0);
                        prop_assert!(request.offset + request.len <= DISK);
                    }
                    Op::GetId => prop_assert!(total > 0),
                    Op::Flush => prop_assert!(s.buffers.is_empty()),
                    Op::Discard | Op::WriteZeroes => {
                        prop_assert!(!s.ranges.is_empty() && s.ranges.len() <= MAX_SEGMENTS);
                        for r in &s.ranges {
                            prop_assert!(r.offset + r.len <= DISK);
                            prop_assert!(request.op == Op::WriteZeroes || !r.unmap);
                        }
                    }
                }
            }
        }
    }

    /// A chain longer than the ring (a loop the queue did not catch) is read only up to
    /// the ring's size.
    #[test]
    fn an_endless_chain_is_cut_at_the_ring_size() {
        let m = ram();
        let h = header(&m, 0x0, request_type::IN, 0);
        let endless = std::iter::once(h).chain(std::iter::repeat(inn(0x1000, 512)));
        let p = parse(endless, &m, &shape(), &mut Scratch::default());
        // The 256th descriptor is 512 bytes: no status.
        assert_eq!(p, Parsed::NoStatus);
    }
}
