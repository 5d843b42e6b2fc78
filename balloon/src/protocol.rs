//! virtio-balloon protocol facts (virtio 1.x, 5.5, and Linux `virtio_balloon.c`).

/// virtio device ID of the balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;

/// The guest must tell the host before reusing deflated pages.
pub const F_MUST_TELL_HOST: u64 = 1 << 0;
/// Statistics queue present.
pub const F_STATS_VQ: u64 = 1 << 1;
/// The guest may deflate the balloon under memory pressure.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// Free page hinting queue present; the host asks for hints through the config space.
pub const F_FREE_PAGE_HINT: u64 = 1 << 3;
/// The guest reports its page poison value.
pub const F_PAGE_POISON: u64 = 1 << 4;
/// Free page reporting queue present.
pub const F_PAGE_REPORTING: u64 = 1 << 5;

/// Page numbers in inflate/deflate buffers are in 4 KiB units whatever the guest's page size.
pub const PFN_SHIFT: u32 = 12;
/// Size of the unit a PFN names.
pub const BALLOON_PAGE_SIZE: u64 = 1 << PFN_SHIFT;

/// Config space offsets (all fields le32).
pub mod config {
    /// Target balloon size in pages (host writes).
    pub const NUM_PAGES: u64 = 0;
    /// Current balloon size in pages (guest writes).
    pub const ACTUAL: u64 = 4;
    /// Free page hint command ID (host writes; with FREE_PAGE_HINT).
    pub const FREE_PAGE_HINT_CMD_ID: u64 = 8;
    /// The guest's page poison value (guest writes, with PAGE_POISON).
    pub const POISON_VAL: u64 = 12;
    /// Config length when PAGE_POISON is offered.
    pub const LEN_WITH_POISON: u64 = 16;
    /// Config length with FREE_PAGE_HINT but not PAGE_POISON.
    pub const LEN_WITH_HINT_CMD_ID: u64 = 12;
    /// Config length otherwise.
    pub const LEN_BASIC: u64 = 8;
}

/// Queue sizes Ebb offers.
pub mod queue_size {
    /// Inflate queue (Linux sends one 256-PFN buffer at a time).
    pub const INFLATE: u16 = 256;
    /// Deflate queue.
    pub const DEFLATE: u16 = 256;
    /// Statistics queue (one buffer in flight).
    pub const STATS: u16 = 2;
    /// Reporting queue: Linux refuses the whole device if this is below its report
    /// capacity (32).
    pub const REPORTING: u16 = 32;
    /// Free page hint queue: Linux keeps one entry for its command ids and spins
    /// allocating and freeing blocks while the ring is full, so a deep ring lets it hand
    /// over many 4 MiB blocks per wake-up of the host.
    pub const FREE_PAGE_HINT: u16 = 256;
}

/// Command ids in `free_page_hint_cmd_id` and on the free page hint queue.
pub mod hint_cmd {
    /// The guest's end of a run (on the queue); the host's "stop" before a run starts.
    pub const STOP: u32 = 0;
    /// The host is done with the hinted blocks: the guest frees them.
    pub const DONE: u32 = 1;
    /// The first id of a run (0 and 1 are taken).
    pub const FIRST_RUN: u32 = 2;
}

/// Most entries one free page report may carry (Linux PAGE_REPORTING_CAPACITY).
pub const REPORT_CAPACITY: usize = 32;

/// The role of a balloon queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// Pages the guest gives to the host.
    Inflate,
    /// Pages the guest takes back.
    Deflate,
    /// Guest memory statistics.
    Stats,
    /// Free page hints.
    FreePageHint,
    /// Free page reports.
    Reporting,
}

/// Queue roles by index for a feature set. Queues of features not in `features` do not
/// exist and later ones move down: the transports number only the queues the driver asks
/// for, in the order inflate, deflate, stats, free page hint, reporting.
pub fn queue_roles(features: u64) -> Vec<QueueRole> {
    let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
    if features & F_STATS_VQ != 0 {
        roles.push(QueueRole::Stats);
    }
    if features & F_FREE_PAGE_HINT != 0 {
        roles.push(QueueRole::FreePageHint);
    }
    if features & F_PAGE_REPORTING != 0 {
        roles.push(QueueRole::Reporting);
    }
    roles
}

/// Maximum ring size for each role.
pub fn max_queue_size(role: QueueRole) -> u16 {
    match role {
        QueueRole::Inflate => queue_size::INFLATE,
        QueueRole::Deflate => queue_size::DEFLATE,
        QueueRole::Stats => queue_size::STATS,
        QueueRole::FreePageHint => queue_size::FREE_PAGE_HINT,
        QueueRole::Reporting => queue_size::REPORTING,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use QueueRole::*;

    #[test]
    fn queue_indexes_follow_negotiated_features() {
        assert_eq!(queue_roles(0), vec![Inflate, Deflate]);
        assert_eq!(queue_roles(F_STATS_VQ), vec![Inflate, Deflate, Stats]);
        assert_eq!(
            queue_roles(F_PAGE_REPORTING),
            vec![Inflate, Deflate, Reporting]
        );
        assert_eq!(
            queue_roles(F_STATS_VQ | F_PAGE_REPORTING),
            vec![Inflate, Deflate, Stats, Reporting]
        );
        assert_eq!(
            queue_roles(F_STATS_VQ | F_FREE_PAGE_HINT | F_PAGE_REPORTING),
            vec![Inflate, Deflate, Stats, FreePageHint, Reporting]
        );
        assert_eq!(
            queue_roles(F_FREE_PAGE_HINT | F_PAGE_REPORTING),
            vec![Inflate, Deflate, FreePageHint, Reporting]
        );
        // Features without queues change nothing.
        assert_eq!(
            queue_roles(F_DEFLATE_ON_OOM | F_PAGE_POISON | F_MUST_TELL_HOST),
            vec![Inflate, Deflate]
        );
        assert!(max_queue_size(Reporting) >= REPORT_CAPACITY as u16);
    }
}
