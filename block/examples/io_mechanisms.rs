//! A microbenchmark of the two ways Ebb could run disk requests, on a warm image (in the
//! host's page cache), reading into guest RAM with the device's own `io::read_into`:
//!
//! - **inline**: the event loop does each `preadv` itself (what `ebb-block` did before its
//!   I/O threads);
//! - **worker**: the event loop hands each request to a worker thread over a bounded
//!   channel and waits for completions on another (one thread: the hand-off's cost; the
//!   device's own pool is measured with `ebb-bench disk`).
//!
//! For each request size it prints requests per second (the worker kept `DEPTH` requests
//! queued, as a busy ring would) and the median time from submission to completion with
//! one request at a time (the hand-off's own cost).
//!
//! ```sh
//! cargo run --release -p ebb-block --example io_mechanisms
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{channel, sync_channel};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use ebb_devices::ram::{GuestRam, RamBuffer, RamOptions};
use vm_memory::GuestAddress;

const IMAGE_BYTES: u64 = 64 << 20;
const RAM_BYTES: u64 = 16 << 20;
const DEPTH: usize = 64;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The `i`th request of `size` bytes: where it reads in the image and lands in RAM.
fn request(ram: &GuestRam, size: u64, i: u64) -> (RamBuffer, u64) {
    let slots = RAM_BYTES / size;
    let buffer = ram.buffer((i % slots) * size, size).expect("in RAM");
    // A stride through the image that is not a multiple of the RAM slots.
    let offset = (i * 7 * size) % (IMAGE_BYTES - size);
    (buffer, offset / 512 * 512)
}

fn inline(file: &File, ram: &GuestRam, size: u64, n: u64) -> (f64, Duration) {
    let mut latencies = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        let (buffer, offset) = request(ram, size, i);
        ebb_block::io::read_into(file, &[buffer], offset).expect("read");
        latencies.push(t.elapsed());
    }
    (n as f64 / start.elapsed().as_secs_f64(), median(latencies))
}

fn worker(file: &Arc<File>, ram: &GuestRam, size: u64, n: u64, depth: usize) -> (f64, Duration) {
    let (submit, requests) = sync_channel::<(RamBuffer, u64, Instant)>(depth);
    let (complete, completions) = channel::<Instant>();
    let image = file.clone();
    let io = thread::spawn(move || {
        for (buffer, offset, submitted) in requests {
            ebb_block::io::read_into(&image, &[buffer], offset).expect("read");
            if complete.send(submitted).is_err() {
                break;
            }
        }
    });
    let mut latencies = Vec::with_capacity(n as usize);
    let start = Instant::now();
    let mut in_flight = 0;
    for i in 0..n {
        let (buffer, offset) = request(ram, size, i);
        // Keep the channel full, as a ring of waiting requests would.
        while in_flight >= depth {
            latencies.push(completions.recv().expect("worker").elapsed());
            in_flight -= 1;
        }
        submit
            .send((buffer, offset, Instant::now()))
            .expect("worker");
        in_flight += 1;
    }
    drop(submit);
    while in_flight > 0 {
        latencies.push(completions.recv().expect("worker").elapsed());
        in_flight -= 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    io.join().expect("worker");
    (rate, median(latencies))
}

fn main() {
    let path = std::env::temp_dir().join(format!("ebb-io-bench-{}", std::process::id()));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .expect("image");
    let chunk = vec![0x5au8; 1 << 20];
    for at in (0..IMAGE_BYTES).step_by(chunk.len()) {
        file.write_all_at(&chunk, at).expect("fill");
    }
    let file = Arc::new(file);
    let ram = GuestRam::new(&[(GuestAddress(0), RAM_BYTES)], RamOptions::default()).expect("ram");
    // Warm the page cache and fault guest RAM in.
    inline(&file, &ram, 1 << 20, IMAGE_BYTES >> 20);
    println!(
        "{:>9} {:>14} {:>14} {:>16} {:>16}",
        "request", "inline req/s", "worker req/s", "inline p50 us", "worker p50 us"
    );
    for (size, n) in [
        (4u64 << 10, 100_000u64),
        (64 << 10, 30_000),
        (1 << 20, 3_000),
    ] {
        let (ri, li) = inline(&file, &ram, size, n);
        let (rw, _) = worker(&file, &ram, size, n, DEPTH);
        let (_, lw) = worker(&file, &ram, size, n / 10, 1);
        println!(
            "{:>7}Ki {:>14.0} {:>14.0} {:>16.1} {:>16.1}",
            size >> 10,
            ri,
            rw,
            li.as_secs_f64() * 1e6,
            lw.as_secs_f64() * 1e6
        );
    }
    let _ = std::fs::remove_file(path);
}
