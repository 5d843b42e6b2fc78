//! Guest console output that can neither stall the guest nor fill the host's disk.
//!
//! The UART hands each byte to a [`ConsoleOutput`], which only appends it to a bounded
//! buffer: the vCPU thread never waits for a terminal, pipe or disk. A writer thread
//! empties the buffer into the real destination. When the destination is slower than
//! the guest and the buffer is full, bytes are dropped and counted, and the output says
//! so (`[ebb: N bytes of console output dropped]`) once it catches up. A file can be
//! capped: past `max` bytes the output ends with a line saying how much was cut off.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bytes of console output held for a slow destination before output is dropped.
pub const BUFFER_BYTES: usize = 1 << 20;

/// How long [`ConsoleOutput::flush`] waits for the writer to empty the buffer.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct State {
    pending: VecDeque<u8>,
    /// Dropped since the last marker went out.
    dropped: u64,
    /// Dropped in all.
    dropped_total: u64,
    /// The writer is writing (bytes taken from `pending` not yet written).
    busy: bool,
    closed: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled when there is output (for the writer) or the buffer emptied (flush).
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The UART's side: appends without blocking on the destination.
#[derive(Debug, Clone)]
pub struct ConsoleOutput {
    shared: Arc<Shared>,
    capacity: usize,
}

/// The writer thread's handle: closing it writes out what is left and ends the thread.
#[derive(Debug)]
pub struct ConsoleWriter {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A destination with an optional size cap.
struct Destination<W: Write> {
    out: W,
    max: Option<u64>,
    written: u64,
    cut_off: u64,
}

impl<W: Write> Destination<W> {
    /// Writes `bytes`, up to the cap; past it, counts what is cut off and says so once.
    fn write(&mut self, bytes: &[u8]) {
        let room = match self.max {
            Some(max) => max.saturating_sub(self.written),
            None => u64::MAX,
        };
        let take = bytes.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        if take > 0 {
            // A destination that fails (a closed terminal, a full disk) loses the output;
            // the guest must not notice.
            let _ = self.out.write_all(&bytes[..take]);
            let _ = self.out.flush();
            self.written += take as u64;
        }
        let cut = (bytes.len() - take) as u64;
        if cut > 0 {
            if self.cut_off == 0 {
                let max = self.max.unwrap_or(0);
                let _ = write!(
                    self.out,
                    "\n[ebb: console output stopped at its limit of {max} bytes; the rest is dropped]\n"
                );
                let _ = self.out.flush();
            }
            self.cut_off += cut;
        }
    }
}

impl ConsoleOutput {
    /// Output going to `out` (stdout, a file) through a writer thread, at most `max`
    /// bytes of it when given.
    /// `setup` runs first on the writer thread (the VMM installs its system call filter
    /// there); if it fails, the thread logs why and writes nothing.
    pub fn spawn<W: Write + Send + 'static>(
        out: W,
        max: Option<u64>,
        setup: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> io::Result<(Self, ConsoleWriter)> {
        Self::spawn_with_capacity(out, max, BUFFER_BYTES, setup)
    }

    fn spawn_with_capacity<W: Write + Send + 'static>(
        out: W,
        max: Option<u64>,
        capacity: usize,
        setup: impl FnOnce() -> Result<(), String> + Send + 'static,
    ) -> io::Result<(Self, ConsoleWriter)> {
        let shared = Arc::new(Shared::default());
        let mut destination = Destination {
            out,
            max,
            written: 0,
            cut_off: 0,
        };
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ebb-console".into())
            .spawn(move || match setup() {
                Ok(()) => write_out(&thread_shared, &mut destination),
                Err(e) => tracing::error!("console output thread: {e}; console output is lost"),
            })?;
        Ok((
            Self {
                shared: shared.clone(),
                capacity,
            },
            ConsoleWriter {
                shared,
                thread: Some(thread),
            },
        ))
    }

    /// Bytes dropped because the destination could not keep up.
    pub fn dropped_total(&self) -> u64 {
        self.shared.lock().dropped_total
    }
}

/// The writer thread: takes what is pending, writes it without holding the lock.
fn write_out<W: Write>(shared: &Shared, destination: &mut Destination<W>) {
    loop {
        let (bytes, dropped, closed) = {
            let mut state = shared.lock();
            while state.pending.is_empty() && state.dropped == 0 && !state.closed {
                state.busy = false;
                shared.changed.notify_all();
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            state.busy = true;
            let bytes: Vec<u8> = state.pending.drain(..).collect();
            let dropped = std::mem::take(&mut state.dropped);
            (bytes, dropped, state.closed)
        };
        destination.write(&bytes);
        if dropped > 0 {
            let marker = format!("\n[ebb: {dropped} bytes of console output dropped]\n");
            destination.write(marker.as_bytes());
        }
        if closed && bytes.is_empty() && dropped == 0 {
            let mut state = shared.lock();
            state.busy = false;
            shared.changed.notify_all();
            return;
        }
    }
}

impl Write for ConsoleOutput {
    /// Appends what fits in the buffer and drops the rest (counted); never blocks on the
    /// destination.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        let room = self.capacity.saturating_sub(state.pending.len());
        let take = buf.len().min(room);
        state.pending.extend(&buf[..take]);
        let lost = (buf.len() - take) as u64;
        state.dropped += lost;
        state.dropped_total += lost;
        self.shared.changed.notify_all();
        Ok(buf.len())
    }

    /// Waits (up to [`FLUSH_TIMEOUT`]) for the writer to have written everything so far.
    fn flush(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + FLUSH_TIMEOUT;
        let mut state = self.shared.lock();
        while !state.pending.is_empty() || state.dropped > 0 || state.busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .map(|(s, _)| s)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
        }
        Ok(())
    }
}

impl ConsoleWriter {
    /// Writes out what is pending (waiting at most [`FLUSH_TIMEOUT`]) and ends the thread.
    pub fn close(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + FLUSH_TIMEOUT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::FromRawFd;

    /// A pipe nobody reads yet: writes block once its 64 KiB are full.
    fn pipe() -> (std::fs::File, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: creating a pipe into a two-int array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are new and owned by the files from here on.
        unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    /// A destination that stops reading does not stall the writer of the output (the
    /// vCPU): 8 MiB go in at once, the excess is dropped, and once someone reads, the
    /// output says how much was lost.
    #[test]
    fn a_stalled_destination_never_blocks_the_guest() {
        let (mut read_end, write_end) = pipe();
        let (mut out, mut writer) =
            ConsoleOutput::spawn_with_capacity(write_end, None, 256 << 10, || Ok(())).unwrap();
        let start = Instant::now();
        let chunk = vec![b'x'; 4096];
        for _ in 0..2048 {
            out.write_all(&chunk).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "writing took {:?}",
            start.elapsed()
        );
        assert!(out.dropped_total() > 0);
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            read_end.read_to_end(&mut all).unwrap();
            all
        });
        // Once the destination reads again, new output gets through after the marker.
        out.flush().unwrap();
        out.write_all(b"END").unwrap();
        writer.close();
        drop(out);
        drop(writer);
        let all = reader.join().unwrap();
        let text = String::from_utf8_lossy(&all);
        let marker = text
            .find("bytes of console output dropped]")
            .expect("no marker");
        assert!(text.ends_with("END"), "output after the stall lost");
        assert!(marker < text.len() - 3);
        assert!(all.len() < 2 << 20, "{} bytes kept", all.len());
    }

    #[test]
    fn a_capped_file_ends_with_a_marker() {
        let path = std::env::temp_dir().join(format!("ebb-console-cap-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let (mut out, mut writer) = ConsoleOutput::spawn(file, Some(1000), || Ok(())).unwrap();
        for _ in 0..30 {
            out.write_all(&[b'a'; 100]).unwrap();
            out.flush().unwrap();
        }
        writer.close();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let (kept, rest) = text.split_at(1000);
        assert!(kept.bytes().all(|b| b == b'a'));
        assert_eq!(
            rest,
            "\n[ebb: console output stopped at its limit of 1000 bytes; the rest is dropped]\n"
        );
    }

    #[test]
    fn flush_waits_until_the_output_is_out() {
        let path = std::env::temp_dir().join(format!("ebb-console-flush-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let (mut out, _writer) = ConsoleOutput::spawn(file, None, || Ok(())).unwrap();
        out.write_all(b"login: ").unwrap();
        out.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"login: ");
        std::fs::remove_file(&path).unwrap();
    }
}
