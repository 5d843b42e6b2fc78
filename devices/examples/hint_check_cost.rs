//! A microbenchmark of the host's share of a free page hinting run: what
//! `GuestRam::discard_unwritten` costs per GiB of hinted 4 MiB blocks that hold the zeros
//! the guest's allocator wrote (`init_on_alloc`), and how much of it is reading the pages
//! (the zero check) rather than the fence and the discard. With and without transparent
//! huge pages on guest RAM; three rounds each (RAM touched again before each round).
//!
//! ```sh
//! cargo run --release -p ebb-devices --example hint_check_cost [-- GIB]
//! ```

use std::time::Instant;

use ebb_devices::ram::{GuestRam, RamOptions};
use vm_memory::{Bytes, GuestAddress};

const MIB: u64 = 1 << 20;
/// Linux hints blocks of order 10 on x86.
const BLOCK: u64 = 4 * MIB;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Writes zeros over all of guest RAM, one block at a time, so every page is present.
fn touch_zeros(m: &GuestRam, size: u64) {
    let zeros = vec![0u8; BLOCK as usize];
    for gpa in (0..size).step_by(BLOCK as usize) {
        m.memory()
            .write_slice(&zeros, GuestAddress(gpa))
            .expect("inside guest RAM");
    }
}

fn zero_pages(words: &[u64]) -> usize {
    words
        .chunks(512)
        .filter(|page| page.iter().fold(0, |acc, w| acc | w) == 0)
        .count()
}

/// The same loop, compiled for 32-byte loads.
#[target_feature(enable = "avx2")]
fn zero_pages_avx2(words: &[u64]) -> usize {
    zero_pages(words)
}

/// Milliseconds to read every word of guest RAM and count its zero pages (with AVX2
/// loads when `avx2`).
fn scan_ms(m: &GuestRam, size: u64, avx2: bool) -> (f64, usize) {
    let t = Instant::now();
    // SAFETY: all of guest RAM, mapped while `m` lives; nothing writes it meanwhile.
    let words =
        unsafe { std::slice::from_raw_parts(m.host_start() as *const u64, (size / 8) as usize) };
    let zeros = if avx2 {
        // SAFETY: only called where the CPU has AVX2.
        unsafe { zero_pages_avx2(words) }
    } else {
        zero_pages(words)
    };
    (ms(t), zeros)
}

fn main() {
    let gib: u64 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 1,
        Some(Ok(g)) if g > 0 => g,
        Some(_) => {
            eprintln!("usage: hint_check_cost [GIB]");
            std::process::exit(2);
        }
    };
    let size = gib << 30;
    println!(
        "{gib} GiB of guest RAM in {} MiB blocks; ms per GiB",
        BLOCK / MIB
    );
    let avx2 = std::is_x86_feature_detected!("avx2");
    println!(
        "{:<6} {:>6} {:>10} {:>10} {:>16} {:>12}",
        "THP", "round", "scan SSE2", "scan AVX2", "checked discard", "given back"
    );
    for thp in [false, true] {
        let options = RamOptions {
            write_fence: true,
            thp: Some(thp),
            ..RamOptions::default()
        };
        let m = match GuestRam::new(&[(GuestAddress(0), size)], options) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("hint_check_cost: {e}");
                std::process::exit(1);
            }
        };
        for round in 0..3 {
            touch_zeros(&m, size);
            let scan_avx2 = avx2.then(|| {
                let (t, z) = scan_ms(&m, size, true);
                assert_eq!(z as u64, size / 4096, "AVX2: every page holds zeros");
                t / gib as f64
            });
            let (scan, zeros) = scan_ms(&m, size, false);
            assert_eq!(zeros as u64, size / 4096, "every page holds zeros");
            let t = Instant::now();
            let mut given_back = 0;
            for gpa in (0..size).step_by(BLOCK as usize) {
                let block = m.range(gpa, BLOCK).expect("inside guest RAM");
                match m.discard_unwritten(block) {
                    Ok(done) => given_back += done.discarded,
                    Err(e) => {
                        eprintln!("hint_check_cost: {e} (userfaultfd write protection needed)");
                        std::process::exit(1);
                    }
                }
            }
            let checked = ms(t);
            println!(
                "{:<6} {:>6} {:>10.0} {:>10} {:>16.0} {:>9} MiB",
                if thp { "on" } else { "off" },
                round,
                scan / gib as f64,
                scan_avx2.map_or("-".into(), |s| format!("{s:.0}")),
                checked / gib as f64,
                given_back / MIB
            );
        }
    }
}
