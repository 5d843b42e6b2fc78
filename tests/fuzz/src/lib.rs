//! What Ebb's fuzz targets share: small guest RAM layouts and the oracle that no discard
//! ever leaves guest RAM.

use std::sync::atomic::{AtomicUsize, Ordering};

use ebb_devices::ram::{GuestRam, RamOptions};
use vm_memory::GuestAddress;

const MIB: u64 = 1 << 20;

/// Guest RAM as the VMM lays it out, in miniature: two regions around a hole. One
/// mapping for the whole run (guest RAM is never unmapped, as in the VMM), zeroed again
/// for each input.
pub fn small_ram() -> GuestRam {
    static RAM: std::sync::OnceLock<GuestRam> = std::sync::OnceLock::new();
    let ram = RAM.get_or_init(|| {
        GuestRam::new(
            &[(GuestAddress(0), 4 * MIB), (GuestAddress(8 * MIB), 4 * MIB)],
            RamOptions::default(),
        )
        .expect("guest RAM")
    });
    for (gpa, len) in [(0, 4 * MIB), (8 * MIB, 4 * MIB)] {
        let range = ram.range(gpa, len).expect("a region");
        ram.discard(range).expect("zeroing guest RAM");
    }
    ram.clone()
}

static RAM_START: AtomicUsize = AtomicUsize::new(0);
static RAM_LEN: AtomicUsize = AtomicUsize::new(0);

/// Declares the host range discards must stay inside.
pub fn guard_discards(ram: &GuestRam) {
    RAM_START.store(ram.host_start(), Ordering::SeqCst);
    RAM_LEN.store(ram.size() as usize, Ordering::SeqCst);
}

/// Checks one discard against the declared range; aborts the process (a finding) when it
/// leaves it.
pub fn check_discard(addr: usize, len: usize) {
    let start = RAM_START.load(Ordering::SeqCst);
    let ram_len = RAM_LEN.load(Ordering::SeqCst);
    if ram_len == 0 {
        return;
    }
    let inside = addr >= start
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= start + ram_len);
    if !inside {
        eprintln!(
            "FINDING: discard of {len:#x} bytes at {addr:#x} outside guest RAM {start:#x}+{ram_len:#x}"
        );
        std::process::abort();
    }
}

/// Puts an `madvise` into the fuzz binary in front of libc's: discards are checked with
/// [`check_discard`], then made for real (through the raw system call).
#[macro_export]
macro_rules! madvise_oracle {
    () => {
        /// Interposes libc's madvise for the code under test.
        ///
        /// # Safety
        /// As madvise(2): the caller passes a range it owns.
        #[no_mangle]
        pub unsafe extern "C" fn madvise(
            addr: *mut libc::c_void,
            len: libc::size_t,
            advice: libc::c_int,
        ) -> libc::c_int {
            if matches!(
                advice,
                libc::MADV_DONTNEED | libc::MADV_REMOVE | libc::MADV_FREE
            ) {
                $crate::check_discard(addr as usize, len);
            }
            // SAFETY: the same call the code under test made, unchanged.
            unsafe { libc::syscall(libc::SYS_madvise, addr, len, advice) as libc::c_int }
        }
    };
}
