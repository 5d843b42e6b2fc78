//! The virtio-blk wire format (virtio 1.x, 5.2; Linux `include/uapi/linux/virtio_blk.h`):
//! feature bits, request types and status values, the configuration space layout, and
//! the limits Ebb advertises in it.

use virtio_bindings::bindings::virtio_blk as vb;

/// The virtio device ID of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Bytes in a virtio-blk sector: every offset and length the protocol carries counts in
/// these, whatever the image's own block size.
pub const SECTOR_SIZE: u64 = 512;
/// log2 of [`SECTOR_SIZE`].
pub const SECTOR_SHIFT: u32 = 9;

/// Feature bits Ebb may offer.
pub mod features {
    use super::vb;

    /// `size_max` holds the largest data buffer (descriptor) of a request.
    pub const SIZE_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SIZE_MAX;
    /// `seg_max` holds the most data buffers of a request.
    pub const SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
    /// The disk is read-only.
    pub const RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
    /// `blk_size` holds the disk's block size.
    pub const BLK_SIZE: u64 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
    /// The FLUSH request: writes are volatile until flushed (a write-back cache).
    pub const FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
    /// The DISCARD request and its `max_discard_*` fields.
    pub const DISCARD: u64 = 1 << vb::VIRTIO_BLK_F_DISCARD;
    /// The WRITE_ZEROES request and its `max_write_zeroes_*` fields.
    pub const WRITE_ZEROES: u64 = 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;
    /// `used_event`/`avail_event` in the rings: the driver and the device each say when
    /// they next want to hear from the other, so a busy queue takes few kicks and
    /// interrupts (each one an exit).
    pub const EVENT_IDX: u64 = 1 << virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
}

/// Request types (the header's `type` field).
pub mod request_type {
    use super::vb;

    /// Read sectors into the guest's buffers.
    pub const IN: u32 = vb::VIRTIO_BLK_T_IN;
    /// Write the guest's buffers to sectors.
    pub const OUT: u32 = vb::VIRTIO_BLK_T_OUT;
    /// Make completed writes stable.
    pub const FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
    /// The device's ID string (serial number), 20 bytes.
    pub const GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
    /// Ranges of sectors the guest no longer needs.
    pub const DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
    /// Ranges of sectors to read back as zeros.
    pub const WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;
}

/// Request status values (the last byte the device writes).
pub mod status {
    use super::vb;

    /// Success.
    pub const OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
    /// The request failed (or was malformed).
    pub const IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
    /// The request type (or one of its flags) is not supported.
    pub const UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;
}

/// Bytes of the request header (`le32 type, le32 reserved, le64 sector`).
pub const HEADER_LEN: u32 = 16;
/// Bytes of one discard or write-zeroes segment (`le64 sector, le32 num_sectors, le32
/// flags`).
pub const SEGMENT_LEN: u32 = 16;
/// Bytes of the ID string GET_ID returns (NUL-padded, not terminated when full).
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
/// The only flag a write-zeroes segment may carry: the device may deallocate the range.
/// A discard segment may carry none.
pub const WRITE_ZEROES_FLAG_UNMAP: u32 = vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// Size of the request queue. Ebb does not offer indirect descriptors, so a request of
/// [`SEG_MAX`] buffers takes `SEG_MAX + 2` ring entries: the ring holds at least two.
pub const QUEUE_SIZE: u16 = 256;
/// Most data buffers (descriptors between header and status) in one request.
pub const SEG_MAX: u32 = 128;
/// Largest data buffer of a request, in bytes. With [`SEG_MAX`] this caps a read or
/// write at 8 MiB.
pub const SIZE_MAX: u32 = 64 << 10;
/// The block size Ebb reports: the sector size, so any image works.
pub const BLK_SIZE: u32 = 512;
/// Largest discard segment, in sectors (1 GiB): Linux splits larger discards.
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) >> SECTOR_SHIFT;
/// Most segments in one discard request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Discard granularity, in sectors (4 KiB, the usual file system block): a hint for the
/// guest, not a requirement (punching a partial block zeroes it).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// Largest write-zeroes segment, in sectors (16 MiB): bounded because where the file
/// system can neither zero nor punch a range, Ebb writes the zeros itself.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = (16 << 20) >> SECTOR_SHIFT;
/// Most segments in one write-zeroes request (Linux sends one).
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;

/// Offsets of the configuration space fields Ebb fills (`struct virtio_blk_config`).
pub mod config {
    /// `le64 capacity`: the disk's size in 512-byte sectors.
    pub const CAPACITY: usize = 0;
    /// `le32 size_max`.
    pub const SIZE_MAX: usize = 8;
    /// `le32 seg_max`.
    pub const SEG_MAX: usize = 12;
    /// `geometry` (`le16 cylinders, u8 heads, u8 sectors`): not offered, left zero.
    pub const GEOMETRY: usize = 16;
    /// `le32 blk_size`.
    pub const BLK_SIZE: usize = 20;
    /// `topology` (`u8 physical_block_exp, u8 alignment_offset, le16 min_io_size, le32
    /// opt_io_size`), `u8 writeback`, `u8 unused0`, `le16 num_queues`: not offered, zero.
    pub const TOPOLOGY: usize = 24;
    /// `le32 max_discard_sectors`.
    pub const MAX_DISCARD_SECTORS: usize = 36;
    /// `le32 max_discard_seg`.
    pub const MAX_DISCARD_SEG: usize = 40;
    /// `le32 discard_sector_alignment`.
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    /// `le32 max_write_zeroes_sectors`.
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    /// `le32 max_write_zeroes_seg`.
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    /// `u8 write_zeroes_may_unmap`, then `u8 unused1[3]`.
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
    /// Bytes of the configuration space Ebb describes (up to `unused1`; the secure
    /// erase and zoned fields that follow belong to features Ebb does not offer).
    pub const LEN: usize = 60;
}

/// The configuration space of a disk of `capacity_sectors` that offers `offered`.
pub fn config_space(capacity_sectors: u64, offered: u64) -> [u8; config::LEN] {
    let mut c = [0u8; config::LEN];
    let mut put32 = |at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
    put32(config::SIZE_MAX, SIZE_MAX);
    put32(config::SEG_MAX, SEG_MAX);
    put32(config::BLK_SIZE, BLK_SIZE);
    if offered & features::DISCARD != 0 {
        put32(config::MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS);
        put32(config::MAX_DISCARD_SEG, MAX_DISCARD_SEG);
        put32(config::DISCARD_SECTOR_ALIGNMENT, DISCARD_SECTOR_ALIGNMENT);
    }
    if offered & features::WRITE_ZEROES != 0 {
        put32(config::MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SECTORS);
        put32(config::MAX_WRITE_ZEROES_SEG, MAX_WRITE_ZEROES_SEG);
    }
    c[config::CAPACITY..config::CAPACITY + 8].copy_from_slice(&capacity_sectors.to_le_bytes());
    if offered & features::WRITE_ZEROES != 0 {
        c[config::WRITE_ZEROES_MAY_UNMAP] = 1;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use vb::virtio_blk_config as C;

    /// The offsets agree with Linux's `struct virtio_blk_config` (virtio-bindings).
    #[test]
    fn config_layout_matches_the_linux_header() {
        assert_eq!(offset_of!(C, capacity), config::CAPACITY);
        assert_eq!(offset_of!(C, size_max), config::SIZE_MAX);
        assert_eq!(offset_of!(C, seg_max), config::SEG_MAX);
        assert_eq!(offset_of!(C, geometry), config::GEOMETRY);
        assert_eq!(offset_of!(C, blk_size), config::BLK_SIZE);
        assert_eq!(offset_of!(C, physical_block_exp), config::TOPOLOGY);
        assert_eq!(
            offset_of!(C, max_discard_sectors),
            config::MAX_DISCARD_SECTORS
        );
        assert_eq!(offset_of!(C, max_discard_seg), config::MAX_DISCARD_SEG);
        assert_eq!(
            offset_of!(C, discard_sector_alignment),
            config::DISCARD_SECTOR_ALIGNMENT
        );
        assert_eq!(
            offset_of!(C, max_write_zeroes_sectors),
            config::MAX_WRITE_ZEROES_SECTORS
        );
        assert_eq!(
            offset_of!(C, max_write_zeroes_seg),
            config::MAX_WRITE_ZEROES_SEG
        );
        assert_eq!(
            offset_of!(C, write_zeroes_may_unmap),
            config::WRITE_ZEROES_MAY_UNMAP
        );
        assert_eq!(offset_of!(C, max_secure_erase_sectors), config::LEN);
        assert_eq!(
            std::mem::size_of::<vb::virtio_blk_outhdr>(),
            HEADER_LEN as usize
        );
        assert_eq!(
            std::mem::size_of::<vb::virtio_blk_discard_write_zeroes>(),
            SEGMENT_LEN as usize
        );
    }

    #[test]
    fn config_space_fields() {
        let all = features::DISCARD | features::WRITE_ZEROES;
        let c = config_space(2048, all);
        let u32_at = |c: &[u8], at: usize| u32::from_le_bytes(c[at..at + 4].try_into().unwrap());
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32_at(&c, config::SIZE_MAX), SIZE_MAX);
        assert_eq!(u32_at(&c, config::SEG_MAX), SEG_MAX);
        assert_eq!(u32_at(&c, config::BLK_SIZE), 512);
        assert_eq!(u32_at(&c, config::MAX_DISCARD_SECTORS), 1 << 21);
        assert_eq!(u32_at(&c, config::MAX_DISCARD_SEG), MAX_DISCARD_SEG);
        assert_eq!(u32_at(&c, config::DISCARD_SECTOR_ALIGNMENT), 8);
        assert_eq!(u32_at(&c, config::MAX_WRITE_ZEROES_SECTORS), 1 << 15);
        assert_eq!(u32_at(&c, config::MAX_WRITE_ZEROES_SEG), 1);
        assert_eq!(c[config::WRITE_ZEROES_MAY_UNMAP], 1);
        assert!(c[config::GEOMETRY..config::BLK_SIZE]
            .iter()
            .all(|b| *b == 0));
        assert!(c[config::TOPOLOGY..config::MAX_DISCARD_SECTORS]
            .iter()
            .all(|b| *b == 0));
        // A read-only disk offers neither: their fields stay zero.
        let ro = config_space(2048, features::RO);
        assert!(ro[config::MAX_DISCARD_SECTORS..].iter().all(|b| *b == 0));
        // SEG_MAX buffers plus header and status fit the ring.
        assert!(SEG_MAX + 2 <= u32::from(QUEUE_SIZE));
    }
}
