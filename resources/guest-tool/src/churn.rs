//! `churn MIB SECS`: a checksummed working set that grows and shrinks under memory pressure,
//! to catch a host that loses guest writes (free page hinting's race: a block the guest's
//! shrinker gave back to the allocator, written again, then discarded by the host).
//!
//! The set is `MIB / 4` slots of 4 MiB (the size of a hinted block), backed by transparent
//! huge pages where the kernel offers them. Each cycle fills every
//! empty slot with fresh memory, stamping each page as soon as it is mapped (so fresh pages,
//! possibly just returned by the shrinker, are written at once), verifies every held page,
//! rewrites half the slots with a new generation and verifies them, then unmaps half the
//! slots (verified first). A page carries [`WORDS`] words derived from its index and its
//! generation: a page the host dropped reads as zeros and never matches.
//!
//! Runs in a forked child (an OOM kill hits it, not the server). After every cycle the
//! child prints an `EBB-EVENT` `churn` with its running totals, so the host can tell when
//! corruption showed up; the final figures go to the server over a pipe.

use crate::json::Obj;
use crate::sys::{self, Fork};
use crate::worker::{WorkerError, MIB, PAGE};
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Bytes per slot: one hinted block on x86.
pub const CHUNK: usize = 4 * MIB;
/// Transparent huge page size on x86.
const HUGE: usize = 2 * MIB;
/// Stamped words per page, spread over it.
const WORDS: usize = 8;
/// Bad pages listed in a report.
const MAX_BAD_LISTED: usize = 8;

/// What a run found.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Report {
    pub cycles: u64,
    pub pages_checked: u64,
    pub pages_corrupted: u64,
    /// Fresh memory mapped and stamped, MiB.
    pub allocated_mib: u64,
    /// (page index, generation expected, first word found) of the first bad pages.
    pub bad: Vec<(u64, u64, u64)>,
}

/// The stamp of word `k` of page `index` in generation `gen`: never zero.
fn stamp(index: u64, gen: u64, k: u64) -> u64 {
    // splitmix64 finaliser over the three inputs.
    let mut z = index
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(gen.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(k.wrapping_mul(0x94d0_49bb_1331_11eb));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

const PAGES_PER_CHUNK: usize = CHUNK / PAGE;
const WORD_STRIDE: usize = PAGE / WORDS / 8;

/// One mapped slot.
struct Chunk {
    base: *mut u64,
    gen: u64,
}

impl Chunk {
    /// A CHUNK-byte mapping aligned to 2 MiB and marked for transparent huge pages: a
    /// huge page fault under pressure reclaims (the balloon's shrinker hands back its
    /// latest hinted block) and splits a 4 MiB free block at once, so the workload writes
    /// into a block it just got back as soon as it can.
    fn map() -> io::Result<*mut u64> {
        let span = CHUNK + HUGE;
        // SAFETY: a new private anonymous mapping at an address the kernel picks; it
        // aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = p as usize;
        let aligned = (start + HUGE - 1) & !(HUGE - 1);
        let tail = span - (aligned - start) - CHUNK;
        // SAFETY: the head [start, aligned) and the tail after aligned + CHUNK lie inside
        // the mapping just made, which nothing uses yet. A failed madvise only means no
        // huge pages (the kernel may not offer them).
        unsafe {
            if aligned > start {
                libc::munmap(p, aligned - start);
            }
            if tail > 0 {
                libc::munmap((aligned + CHUNK) as *mut libc::c_void, tail);
            }
            libc::madvise(aligned as *mut libc::c_void, CHUNK, libc::MADV_HUGEPAGE);
        }
        Ok(aligned as *mut u64)
    }

    fn write(&self, first_page: u64) {
        for p in 0..PAGES_PER_CHUNK {
            for k in 0..WORDS {
                let v = stamp(first_page + p as u64, self.gen, k as u64);
                // SAFETY: page p < PAGES_PER_CHUNK and word k < WORDS lie inside the
                // CHUNK-byte mapping this chunk owns; volatile so every store happens.
                unsafe {
                    self.base
                        .add(p * PAGE / 8 + k * WORD_STRIDE)
                        .write_volatile(v)
                };
            }
        }
    }

    fn verify(&self, first_page: u64, report: &mut Report) {
        for p in 0..PAGES_PER_CHUNK {
            let index = first_page + p as u64;
            let mut good = true;
            let mut first = 0;
            for k in 0..WORDS {
                // SAFETY: inside the mapping, as in `write`.
                let v = unsafe {
                    self.base
                        .add(p * PAGE / 8 + k * WORD_STRIDE)
                        .read_volatile()
                };
                if k == 0 {
                    first = v;
                }
                good &= v == stamp(index, self.gen, k as u64);
            }
            report.pages_checked += 1;
            if !good {
                report.pages_corrupted += 1;
                if report.bad.len() < MAX_BAD_LISTED {
                    report.bad.push((index, self.gen, first));
                }
            }
        }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: `base` is a CHUNK-byte mapping made by `Chunk::map`, used by nobody else.
        unsafe { libc::munmap(self.base.cast(), CHUNK) };
    }
}

fn emit_progress(report: &Report, started: Instant, held: usize) {
    sys::emit(&format!(
        "EBB-EVENT {}",
        Obj::new()
            .str("event", "churn")
            .uint("cycle", report.cycles)
            .uint("ms", started.elapsed().as_millis() as u64)
            .uint("held_mib", (held * CHUNK / MIB) as u64)
            .uint("pages_checked", report.pages_checked)
            .uint("pages_corrupted", report.pages_corrupted)
            .uint_list(
                "bad_pages",
                &report.bad.iter().map(|b| b.0).collect::<Vec<_>>()
            )
            .finish()
    ));
}

/// The loop, in the child.
fn churn(mib: u64, limit: Duration) -> Result<Report, String> {
    let slots = (mib as usize * MIB / CHUNK).max(2);
    let started = Instant::now();
    let mut held: Vec<Option<Chunk>> = (0..slots).map(|_| None).collect();
    let mut report = Report::default();
    let mut next_gen = 1u64;
    let first_page = |slot: usize| (slot * PAGES_PER_CHUNK) as u64;
    // At least one cycle, however short the limit.
    loop {
        // Grow: fresh memory, stamped as soon as it is mapped.
        for (slot, c) in held.iter_mut().enumerate() {
            if c.is_some() {
                continue;
            }
            let base = Chunk::map().map_err(|e| format!("mmap 4 MiB: {e}"))?;
            let chunk = Chunk {
                base,
                gen: next_gen,
            };
            next_gen += 1;
            chunk.write(first_page(slot));
            report.allocated_mib += (CHUNK / MIB) as u64;
            *c = Some(chunk);
        }
        for (slot, c) in held.iter().enumerate() {
            if let Some(c) = c {
                c.verify(first_page(slot), &mut report);
            }
        }
        // Rewrite half the set in place, then check it again.
        let turn = report.cycles as usize % 2;
        for (slot, c) in held.iter_mut().enumerate() {
            if let Some(c) = c.as_mut().filter(|_| slot % 2 == turn) {
                c.gen = next_gen;
                next_gen += 1;
                c.write(first_page(slot));
                c.verify(first_page(slot), &mut report);
            }
        }
        // Shrink: the other half goes back to the kernel (checked one last time).
        for (slot, c) in held.iter_mut().enumerate() {
            if slot % 2 != turn {
                if let Some(c) = c.take() {
                    c.verify(first_page(slot), &mut report);
                }
            }
        }
        report.cycles += 1;
        let count = held.iter().filter(|c| c.is_some()).count();
        emit_progress(&report, started, count);
        if started.elapsed() >= limit {
            break;
        }
    }
    for (slot, c) in held.iter().enumerate() {
        if let Some(c) = c {
            c.verify(first_page(slot), &mut report);
        }
    }
    Ok(report)
}

fn encode(r: &Result<Report, String>) -> String {
    match r {
        Ok(r) => {
            let mut s = format!(
                "ok {} {} {} {}",
                r.cycles, r.pages_checked, r.pages_corrupted, r.allocated_mib
            );
            for (i, g, f) in &r.bad {
                s.push_str(&format!(" {i}:{g}:{f}"));
            }
            s + "\n"
        }
        Err(e) => format!("err {}\n", e.replace('\n', " ")),
    }
}

fn decode(line: &str) -> Result<Report, String> {
    if let Some(e) = line.strip_prefix("err ") {
        return Err(e.to_string());
    }
    let bad_line = || format!("bad churn reply {line:?}");
    let mut words = line
        .strip_prefix("ok ")
        .ok_or_else(bad_line)?
        .split_whitespace();
    let mut num = || -> Result<u64, String> {
        words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(bad_line)
    };
    let mut r = Report {
        cycles: num()?,
        pages_checked: num()?,
        pages_corrupted: num()?,
        allocated_mib: num()?,
        bad: Vec::new(),
    };
    for w in words {
        let mut it = w.split(':').map(str::parse::<u64>);
        match (it.next(), it.next(), it.next()) {
            (Some(Ok(i)), Some(Ok(g)), Some(Ok(f))) => r.bad.push((i, g, f)),
            _ => return Err(bad_line()),
        }
    }
    Ok(r)
}

/// Runs the workload in a child for `secs` and returns what it found.
pub fn run(mib: u64, secs: Duration) -> Result<Report, WorkerError> {
    let (rep_r, rep_w) = sys::pipe().map_err(WorkerError::Io)?;
    // SAFETY: the server is single-threaded; the child leaves through exit_now.
    match unsafe { sys::fork() }.map_err(WorkerError::Io)? {
        Fork::Child => {
            drop(rep_r);
            let _ = sys::set_oom_score_adj(0);
            let line = encode(&churn(mib, secs));
            let _ = sys::write_all_fd(rep_w.as_raw_fd(), line.as_bytes());
            sys::exit_now(0)
        }
        Fork::Parent(pid) => {
            drop(rep_w);
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match sys::read_fd(rep_r.as_raw_fd(), &mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) => {
                        let _ = sys::kill(pid, libc::SIGKILL);
                        let _ = sys::wait_pid(pid);
                        return Err(WorkerError::Io(e));
                    }
                }
            }
            let exit = sys::wait_pid(pid).map_err(WorkerError::Io)?;
            let line = String::from_utf8_lossy(&out);
            match line.lines().next() {
                Some(l) => decode(l).map_err(WorkerError::Failed),
                None => Err(WorkerError::Died(exit)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_differ_by_index_generation_and_word_and_are_never_zero() {
        let a = stamp(5, 1, 0);
        assert_ne!(a, stamp(6, 1, 0));
        assert_ne!(a, stamp(5, 2, 0));
        assert_ne!(a, stamp(5, 1, 1));
        assert!((0..10_000).all(|i| stamp(i, 0, 0) != 0));
    }

    #[test]
    fn reports_round_trip() {
        let r = Report {
            cycles: 3,
            pages_checked: 1000,
            pages_corrupted: 2,
            allocated_mib: 64,
            bad: vec![(17, 4, 0), (99, 5, 12345)],
        };
        assert_eq!(decode(encode(&Ok(r.clone())).trim_end()), Ok(r));
        assert_eq!(
            decode(encode(&Err("mmap: no\nmore".into())).trim_end()),
            Err("mmap: no more".into())
        );
        assert!(decode("ok 1 2").is_err());
        assert!(decode("ok 1 2 3 4 x:y").is_err());
    }

    #[test]
    fn a_short_run_finds_its_own_pages_intact() {
        let r = churn(8, Duration::ZERO).unwrap();
        assert_eq!(r.cycles, 1);
        assert_eq!(r.pages_corrupted, 0, "{r:?}");
        // Two slots: both filled and checked, one rewritten and checked, one checked before
        // unmapping, the survivor checked at the end.
        assert_eq!(r.pages_checked, 5 * PAGES_PER_CHUNK as u64);
        assert_eq!(r.allocated_mib, 8);
    }

    #[test]
    fn a_lost_page_is_found() {
        let c = Chunk {
            base: Chunk::map().unwrap(),
            gen: 7,
        };
        c.write(0);
        // What a host discard does to one page: it reads back as zeros.
        // SAFETY: page 3 lies inside the chunk's mapping.
        unsafe { libc::madvise(c.base.add(3 * PAGE / 8).cast(), PAGE, libc::MADV_DONTNEED) };
        let mut r = Report::default();
        c.verify(0, &mut r);
        assert_eq!(r.pages_corrupted, 1);
        assert_eq!(r.bad, vec![(3, 7, 0)]);
    }
}
