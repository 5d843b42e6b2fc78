//! PFN and range math: a guest's PFN array (inflate/deflate) and a reported range, turned
//! into host ranges. Oracles: no panic; every entry counted once as valid or rejected;
//! ranges inside guest RAM, in order, disjoint, each valid page once; merging pages into
//! runs loses and adds nothing; discarding the ranges never leaves guest RAM.
#![no_main]

use ebb_balloon::pages::{check_pfns, check_report, page_runs};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;

ebb_fuzz::madvise_oracle!();

fuzz_target!(|data: &[u8]| {
    let ram = ebb_fuzz::small_ram();
    ebb_fuzz::guard_discards(&ram);
    let pfns: Vec<u32> = data
        .chunks_exact(4)
        .map(|b| {
            // Mostly near guest RAM (12 MiB = 3072 pages), sometimes anywhere.
            let raw = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            if raw & 0x8000_0000 != 0 {
                raw
            } else {
                raw % 4096
            }
        })
        .collect();
    let checked = check_pfns(&ram, pfns.clone());
    assert_eq!(checked.valid_entries + checked.rejected, pfns.len() as u64);
    let mut previous_end = 0;
    for r in &checked.ranges {
        assert!(r.len() > 0);
        assert!(
            r.gpa() >= previous_end,
            "ranges overlap or are out of order"
        );
        assert!(ram.range(r.gpa(), r.len()).is_some(), "range outside RAM");
        previous_end = r.end();
    }
    let pages: Vec<u32> = checked.pages().collect();
    let mut expected: Vec<u32> = pfns
        .iter()
        .copied()
        .filter(|&p| ram.range(u64::from(p) << 12, 4096).is_some())
        .collect();
    expected.sort_unstable();
    expected.dedup();
    assert_eq!(pages, expected);
    assert_eq!(
        checked.valid_entries - checked.repeats,
        expected.len() as u64
    );
    let runs = page_runs(&expected);
    let expanded: Vec<u32> = runs
        .iter()
        .flat_map(|r| (0..r.count).map(move |i| r.first + i))
        .collect();
    assert_eq!(expanded, expected);
    for r in checked.ranges {
        let _ = ram.discard(r);
    }
    // A reported range from the first 16 bytes.
    if data.len() >= 14 {
        let addr = u64::from_le_bytes(data[0..8].try_into().unwrap());
        let len = u32::from_le_bytes(data[8..12].try_into().unwrap());
        let flags = u16::from_le_bytes(data[12..14].try_into().unwrap());
        let desc = Descriptor::new(addr, len, flags, 0);
        if let Some(r) = check_report(&ram, &desc) {
            assert!(ram.range(r.gpa(), r.len()).is_some());
            let _ = ram.discard(r);
        }
    }
});
