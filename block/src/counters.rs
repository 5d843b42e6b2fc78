//! What a disk did, counted for the API and metrics: requests and bytes by operation,
//! host I/O failures, and guest requests refused, by reason.

/// An operation the guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// VIRTIO_BLK_T_IN: read sectors.
    Read,
    /// VIRTIO_BLK_T_OUT: write sectors.
    Write,
    /// VIRTIO_BLK_T_FLUSH: make writes stable (`fdatasync`).
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the disk's ID string.
    GetId,
    /// VIRTIO_BLK_T_DISCARD: deallocate ranges.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES: zero ranges.
    WriteZeroes,
}

impl Op {
    /// Every operation, in a fixed order (for metrics).
    pub const ALL: [Op; 6] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::GetId,
        Op::Discard,
        Op::WriteZeroes,
    ];

    /// A stable name (the `op` label in /metrics).
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::GetId => "get_id",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
        }
    }

    /// True for the operations that change the image.
    pub fn writes(self) -> bool {
        matches!(self, Op::Write | Op::Discard | Op::WriteZeroes)
    }
}

/// Why a guest request was refused (answered IOERR or UNSUPP, or not answered at all for
/// [`Reject::NoStatus`]) without touching the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// No usable status descriptor (the last one must be device-writable and 1 byte,
    /// inside guest RAM): the chain goes back with used length 0 and nothing done.
    NoStatus,
    /// A chain through an indirect table (never offered), or a broken available ring.
    Chain,
    /// The header is missing, device-writable, or not 16 bytes.
    Header,
    /// A data buffer in the wrong direction for the request.
    Direction,
    /// A data buffer that is empty, outside guest RAM, larger than `size_max`, or one
    /// more than `seg_max`.
    Buffer,
    /// A data length that does not fit the request: none, not whole sectors (or whole
    /// segments), or data on a flush.
    Length,
    /// Sectors past the end of the image, or offset arithmetic that overflows.
    Range,
    /// Discard or write-zeroes segments: too many, too large, or with flags set that
    /// the request may not carry.
    Segment,
    /// A write, discard or write-zeroes on a read-only disk.
    ReadOnly,
    /// An unknown request type, or one whose feature was not negotiated.
    Unsupported,
}

impl Reject {
    /// Every reason, in a fixed order (for metrics).
    pub const ALL: [Reject; 10] = [
        Reject::NoStatus,
        Reject::Chain,
        Reject::Header,
        Reject::Direction,
        Reject::Buffer,
        Reject::Length,
        Reject::Range,
        Reject::Segment,
        Reject::ReadOnly,
        Reject::Unsupported,
    ];

    /// A stable name (the `reason` label in /metrics).
    pub fn name(self) -> &'static str {
        match self {
            Reject::NoStatus => "no_status",
            Reject::Chain => "chain",
            Reject::Header => "header",
            Reject::Direction => "direction",
            Reject::Buffer => "buffer",
            Reject::Length => "length",
            Reject::Range => "range",
            Reject::Segment => "segment",
            Reject::ReadOnly => "read_only",
            Reject::Unsupported => "unsupported",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockCounters {
    /// Requests completed successfully, by [`Op`] (in [`Op::ALL`] order).
    pub completed: [u64; Op::ALL.len()],
    /// Bytes read from the image into guest memory.
    pub read_bytes: u64,
    /// Bytes written from guest memory to the image.
    pub written_bytes: u64,
    /// Bytes discarded (holes punched).
    pub discarded_bytes: u64,
    /// Bytes zeroed by write-zeroes requests.
    pub zeroed_bytes: u64,
    /// Requests that failed on the host (a read, write, sync or fallocate error):
    /// answered IOERR.
    pub io_errors: u64,
    /// Reads answered on the event loop from the host's page cache (also counted in
    /// `completed`).
    pub cached_reads: u64,
    /// Requests refused, by [`Reject`] (in [`Reject::ALL`] order).
    pub rejected: [u64; Reject::ALL.len()],
}

impl BlockCounters {
    /// Successful requests of `op`.
    pub fn completed(&self, op: Op) -> u64 {
        self.completed[op as usize]
    }

    /// Requests refused for `reason`.
    pub fn rejected(&self, reason: Reject) -> u64 {
        self.rejected[reason.index()]
    }

    /// All requests refused.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }

    /// Counts a successful `op`.
    pub fn count_completed(&mut self, op: Op) {
        self.completed[op as usize] += 1;
    }

    /// Counts a refusal.
    pub fn count_rejected(&mut self, reason: Reject) {
        self.rejected[reason.index()] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_distinct_and_indexes_follow_all() {
        for (i, r) in Reject::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
        let mut names: Vec<_> = Reject::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Reject::ALL.len());
        let mut c = BlockCounters::default();
        c.count_rejected(Reject::Range);
        c.count_rejected(Reject::Range);
        c.count_completed(Op::Flush);
        assert_eq!(c.rejected(Reject::Range), 2);
        assert_eq!(c.rejected_total(), 2);
        assert_eq!(c.completed(Op::Flush), 1);
    }
}
