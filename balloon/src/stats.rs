//! The statistics queue's wire format: packed `{ le16 tag; le64 value; }` entries.

use std::time::SystemTime;

/// Bytes per statistics entry.
pub const ENTRY_SIZE: usize = 10;
/// Largest statistics buffer Ebb reads: far more than the 16 tags Linux knows.
pub const MAX_STATS_BYTES: usize = 64 * ENTRY_SIZE;

/// Statistics tags (Linux `include/uapi/linux/virtio_balloon.h`).
pub mod tag {
    /// Pages swapped in.
    pub const SWAP_IN: u16 = 0;
    /// Pages swapped out.
    pub const SWAP_OUT: u16 = 1;
    /// Major page faults.
    pub const MAJOR_FAULTS: u16 = 2;
    /// Minor page faults.
    pub const MINOR_FAULTS: u16 = 3;
    /// Free memory, bytes.
    pub const FREE_MEMORY: u16 = 4;
    /// Total memory, bytes.
    pub const TOTAL_MEMORY: u16 = 5;
    /// Available memory, bytes.
    pub const AVAILABLE_MEMORY: u16 = 6;
    /// Disk caches, bytes.
    pub const DISK_CACHES: u16 = 7;
    /// Hugetlb page allocations.
    pub const HUGETLB_ALLOCATIONS: u16 = 8;
    /// Hugetlb page allocation failures.
    pub const HUGETLB_FAILURES: u16 = 9;
    /// OOM kills (Linux 6.12+).
    pub const OOM_KILLS: u16 = 10;
    /// Allocation stalls (6.12+).
    pub const ALLOC_STALLS: u16 = 11;
    /// Asynchronous scans (6.12+).
    pub const ASYNC_SCANS: u16 = 12;
    /// Direct scans (6.12+).
    pub const DIRECT_SCANS: u16 = 13;
    /// Asynchronous reclaims (6.12+).
    pub const ASYNC_RECLAIMS: u16 = 14;
    /// Direct reclaims (6.12+).
    pub const DIRECT_RECLAIMS: u16 = 15;
}

/// One statistics report from the guest. A field is `None` when the guest did not send it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestStats {
    /// When the report arrived.
    pub received_at: Option<SystemTime>,
    /// Pages swapped in.
    pub swap_in: Option<u64>,
    /// Pages swapped out.
    pub swap_out: Option<u64>,
    /// Major faults.
    pub major_faults: Option<u64>,
    /// Minor faults.
    pub minor_faults: Option<u64>,
    /// Free memory in bytes.
    pub free_memory: Option<u64>,
    /// Total memory in bytes.
    pub total_memory: Option<u64>,
    /// Available memory in bytes.
    pub available_memory: Option<u64>,
    /// Disk caches in bytes.
    pub disk_caches: Option<u64>,
    /// Hugetlb allocations.
    pub hugetlb_allocations: Option<u64>,
    /// Hugetlb allocation failures.
    pub hugetlb_failures: Option<u64>,
    /// OOM kills.
    pub oom_kills: Option<u64>,
    /// Allocation stalls.
    pub alloc_stalls: Option<u64>,
    /// Asynchronous scans.
    pub async_scans: Option<u64>,
    /// Direct scans.
    pub direct_scans: Option<u64>,
    /// Asynchronous reclaims.
    pub async_reclaims: Option<u64>,
    /// Direct reclaims.
    pub direct_reclaims: Option<u64>,
    /// Entries with tags Ebb does not know.
    pub unknown_tags: u32,
    /// Trailing bytes that did not make a whole entry.
    pub truncated_bytes: u32,
}

impl GuestStats {
    /// Parses a statistics buffer (at most [`MAX_STATS_BYTES`] are looked at).
    pub fn parse(bytes: &[u8], received_at: SystemTime) -> Self {
        let bytes = &bytes[..bytes.len().min(MAX_STATS_BYTES)];
        let mut s = GuestStats {
            received_at: Some(received_at),
            ..Default::default()
        };
        let mut chunks = bytes.chunks_exact(ENTRY_SIZE);
        for entry in &mut chunks {
            let t = u16::from_le_bytes([entry[0], entry[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&entry[2..10]);
            let value = Some(u64::from_le_bytes(v));
            match t {
                tag::SWAP_IN => s.swap_in = value,
                tag::SWAP_OUT => s.swap_out = value,
                tag::MAJOR_FAULTS => s.major_faults = value,
                tag::MINOR_FAULTS => s.minor_faults = value,
                tag::FREE_MEMORY => s.free_memory = value,
                tag::TOTAL_MEMORY => s.total_memory = value,
                tag::AVAILABLE_MEMORY => s.available_memory = value,
                tag::DISK_CACHES => s.disk_caches = value,
                tag::HUGETLB_ALLOCATIONS => s.hugetlb_allocations = value,
                tag::HUGETLB_FAILURES => s.hugetlb_failures = value,
                tag::OOM_KILLS => s.oom_kills = value,
                tag::ALLOC_STALLS => s.alloc_stalls = value,
                tag::ASYNC_SCANS => s.async_scans = value,
                tag::DIRECT_SCANS => s.direct_scans = value,
                tag::ASYNC_RECLAIMS => s.async_reclaims = value,
                tag::DIRECT_RECLAIMS => s.direct_reclaims = value,
                _ => s.unknown_tags += 1,
            }
        }
        s.truncated_bytes = chunks.remainder().len() as u32;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(t: u16, v: u64) -> Vec<u8> {
        let mut e = t.to_le_bytes().to_vec();
        e.extend_from_slice(&v.to_le_bytes());
        e
    }

    #[test]
    fn every_known_tag_lands_in_its_field() {
        let mut buf = Vec::new();
        for t in 0..16u16 {
            buf.extend(entry(t, 1000 + u64::from(t)));
        }
        let now = SystemTime::now();
        let s = GuestStats::parse(&buf, now);
        assert_eq!(s.received_at, Some(now));
        let fields = [
            s.swap_in,
            s.swap_out,
            s.major_faults,
            s.minor_faults,
            s.free_memory,
            s.total_memory,
            s.available_memory,
            s.disk_caches,
            s.hugetlb_allocations,
            s.hugetlb_failures,
            s.oom_kills,
            s.alloc_stalls,
            s.async_scans,
            s.direct_scans,
            s.async_reclaims,
            s.direct_reclaims,
        ];
        for (i, f) in fields.iter().enumerate() {
            assert_eq!(*f, Some(1000 + i as u64), "tag {i}");
        }
        assert_eq!((s.unknown_tags, s.truncated_bytes), (0, 0));
    }

    #[test]
    fn unknown_tags_and_truncation_are_counted() {
        let mut buf = entry(tag::FREE_MEMORY, 42);
        buf.extend(entry(99, 1));
        buf.extend(entry(tag::FREE_MEMORY, 43));
        buf.extend_from_slice(&[5, 0, 1, 2]);
        let s = GuestStats::parse(&buf, SystemTime::now());
        assert_eq!(s.free_memory, Some(43), "last value wins");
        assert_eq!(s.total_memory, None);
        assert_eq!(s.unknown_tags, 1);
        assert_eq!(s.truncated_bytes, 4);
        let empty = GuestStats::parse(&[], SystemTime::now());
        assert_eq!(empty.free_memory, None);
    }

    #[test]
    fn oversized_buffers_are_bounded() {
        let buf = vec![0u8; MAX_STATS_BYTES * 10];
        let s = GuestStats::parse(&buf, SystemTime::now());
        assert_eq!(s.swap_in, Some(0));
        assert_eq!(s.truncated_bytes, 0);
    }
}
