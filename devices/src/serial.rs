//! The 16550 UART at COM1 (vm-superio's model) with its output sink and interrupt.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, BorrowedFd};

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::console_output::ConsoleOutput;

/// COM1's first port.
pub const COM1_PORT: u16 = 0x3f8;
/// Ports a 16550 occupies.
pub const COM1_PORT_LEN: u16 = 8;
/// COM1's ISA interrupt.
pub const COM1_IRQ: u32 = 4;

/// Signals an interrupt by writing to an eventfd (registered with KVM as an irqfd).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Tells the event loop that the guest drained the receive FIFO, so pending console
/// input can be delivered.
#[derive(Debug)]
pub struct InputDrained(pub EventFd);

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.write(1);
    }
}

/// Where guest console output goes: through a bounded buffer and a writer thread
/// ([`ConsoleOutput`]), so a slow terminal or disk never stalls the vCPU, or nowhere.
#[derive(Debug)]
pub enum SerialOutput {
    /// To a destination (stdout, a file) through its writer thread.
    Console(ConsoleOutput),
    /// Discarded.
    Sink,
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            SerialOutput::Console(c) => c.write(buf),
            SerialOutput::Sink => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            SerialOutput::Console(c) => c.flush(),
            SerialOutput::Sink => Ok(()),
        }
    }
}

/// The process's standard output, written with plain write(2) calls (no buffering, no
/// lock shared with Rust's `stdout()`).
#[derive(Debug, Default)]
pub struct RawStdout;

impl Write for RawStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: fd 1 stays open for the life of the process.
        let fd = unsafe { BorrowedFd::borrow_raw(io::stdout().as_raw_fd()) };
        write_fd(fd, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn write_fd(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is a valid slice for the duration of the call and `fd` is open.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// COM1 as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, InputDrained, SerialOutput>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `interrupt` and writing to `output`. Returns the device and the
    /// eventfd that fires when the guest has drained received input.
    pub fn new(interrupt: EventFd, output: SerialOutput) -> io::Result<(Self, EventFd)> {
        let drained = crate::new_eventfd()?;
        let events = InputDrained(drained.try_clone()?);
        let serial = Serial::with_events(EventFdTrigger(interrupt), events, output);
        Ok((Self { serial }, drained))
    }

    /// Queues console input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.serial.fifo_capacity() == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input: {e:?}");
                0
            }
        }
    }

    /// Flushes the output sink.
    pub fn flush(&mut self) {
        let _ = self.serial.writer_mut().flush();
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Ok(offset) = u8::try_from(offset) {
            data[0] = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(e) = self.serial.write(offset, value) {
            tracing::debug!("serial write: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn transmits_to_file_and_receives_input() {
        let path = std::env::temp_dir().join(format!("ebb-serial-test-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let (output, _writer) = ConsoleOutput::spawn(file, None, || Ok(())).unwrap();
        let irq = crate::new_eventfd().unwrap();
        let (mut dev, drained) =
            SerialDevice::new(irq.try_clone().unwrap(), SerialOutput::Console(output)).unwrap();
        for b in b"hi\n" {
            dev.write(THR, &[*b]);
        }
        dev.flush();
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
        std::fs::remove_file(&path).unwrap();

        // Enable the "data available" interrupt, then feed input.
        dev.write(IER, &[0x01]);
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        dev.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut byte = [0u8];
        dev.read(THR, &mut byte);
        assert_eq!(byte[0], b'o');
        dev.read(THR, &mut byte);
        assert_eq!(byte[0], b'k');
        assert_eq!(drained.read().unwrap(), 1, "drained notification");
    }

    #[test]
    fn input_beyond_fifo_is_refused_not_lost() {
        let irq = crate::new_eventfd().unwrap();
        let (mut dev, _drained) = SerialDevice::new(irq, SerialOutput::Sink).unwrap();
        let big = vec![b'x'; 200];
        let taken = dev.enqueue_input(&big);
        assert!(taken > 0 && taken < big.len());
        assert_eq!(dev.enqueue_input(&big[taken..]), 0);
    }
}
