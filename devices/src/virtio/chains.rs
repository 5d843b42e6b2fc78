//! Checks on descriptor chains that `virtio-queue` does not make for a device.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

/// Whether the chain starting at `head` leads into an indirect descriptor table.
///
/// `virtio-queue` follows indirect tables whether or not VIRTIO_RING_F_INDIRECT_DESC was
/// negotiated; Ebb never offers it, so a chain that uses one is malformed. Reads at most
/// one descriptor per ring entry; an unreadable or looping chain reads as not indirect
/// (the chain walk itself rejects those).
pub fn uses_indirect_table<M: GuestMemory>(mem: &M, queue: &Queue, head: u16) -> bool {
    let table = GuestAddress(queue.desc_table());
    let size = queue.size();
    let mut index = head;
    for _ in 0..size {
        if index >= size {
            return false;
        }
        let Some(addr) = table.checked_add(u64::from(index) * 16) else {
            return false;
        };
        let Ok(raw) = mem.read_obj::<RawDescriptor>(addr) else {
            return false;
        };
        let desc = Descriptor::from(raw);
        if desc.refers_to_indirect_table() {
            return true;
        }
        if !desc.has_next() {
            return false;
        }
        index = desc.next();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    #[test]
    fn an_indirect_descriptor_anywhere_in_the_chain_is_found() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let next = VRING_DESC_F_NEXT;
        let table = [
            desc(0x8000, 16, next, 1),
            desc(0x9000, 16, 0, 0),
            desc(0xa000, 16, next, 3),
            desc(0xb000, 32, VRING_DESC_F_INDIRECT, 0),
            desc(0xc000, 32, VRING_DESC_F_INDIRECT, 0),
        ];
        vq.build_desc_chain(&table[..2]).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        for (i, d) in table.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        assert!(!uses_indirect_table(&mem, &queue, 0), "plain chain");
        assert!(uses_indirect_table(&mem, &queue, 2), "second link indirect");
        assert!(uses_indirect_table(&mem, &queue, 4), "head indirect");
        assert!(!uses_indirect_table(&mem, &queue, 99), "head out of range");
    }

    #[test]
    fn a_looping_chain_ends_the_walk() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 4);
        let next = VRING_DESC_F_NEXT;
        let table = [desc(0x8000, 16, next, 1), desc(0x9000, 16, next, 0)];
        vq.build_desc_chain(&table).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        for (i, d) in table.iter().enumerate() {
            vq.desc_table().store(i as u16, *d).unwrap();
        }
        assert!(!uses_indirect_table(&mem, &queue, 0));
    }
}
