//! The host calls that move a request's data: `preadv`/`pwritev` straight between the
//! image and guest RAM ([`RamBuffer`]s, already validated), `fdatasync`, and `fallocate`
//! for discard and write-zeroes. Callers have checked every offset and length against the
//! image's size; these functions only loop over short transfers and interruptions.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use ebb_devices::ram::RamBuffer;

use crate::protocol::SEG_MAX;

/// Most buffers one request hands to one vectored call.
const MAX_IOVECS: usize = SEG_MAX as usize;

/// A run of zeros to write from where the file system can neither zero nor punch.
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

#[derive(Clone, Copy)]
enum Direction {
    /// Image to guest.
    Read,
    /// Guest to image.
    Write,
}

/// Reads `[offset, offset + total)` of the image into `bufs`, in order.
pub fn read_into(file: &File, bufs: &[RamBuffer], offset: u64) -> io::Result<()> {
    transfer(file, bufs, offset, Direction::Read)
}

/// What a read that may not wait did ([`read_cached`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CachedRead {
    /// Every byte came from the host's page cache.
    Done,
    /// Not all of it is cached (or the call failed): an I/O thread reads it all.
    Wait,
    /// The file system cannot read without waiting (`RWF_NOWAIT` refused, as tmpfs does
    /// before Linux 6.6): asking again is pointless.
    Unsupported,
}

/// Reads `[offset, offset + total)` of the image into `bufs` only if it is all in the
/// host's page cache: one `preadv2` with `RWF_NOWAIT`, which never waits for a device.
/// Anything short of the whole range is [`CachedRead::Wait`]: the bytes it did copy are
/// written again by the full read that follows.
pub fn read_cached(file: &File, bufs: &[RamBuffer], offset: u64) -> CachedRead {
    let (Ok(pos), Ok(iov)) = (libc::off_t::try_from(offset), iovec_array(bufs)) else {
        return CachedRead::Wait;
    };
    let total: usize = bufs.iter().map(RamBuffer::len).sum();
    // SAFETY: every iovec describes guest RAM (RamBuffer, inside one region), which stays
    // mapped for the life of the process; the kernel checks the rest.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            iov.as_ptr(),
            bufs.len() as libc::c_int,
            pos,
            libc::RWF_NOWAIT,
        )
    };
    if n >= 0 {
        return if n as usize == total {
            CachedRead::Done
        } else {
            CachedRead::Wait
        };
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) => CachedRead::Unsupported,
        _ => CachedRead::Wait,
    }
}

/// Writes `bufs`, in order, to the image from `offset`.
pub fn write_from(file: &File, bufs: &[RamBuffer], offset: u64) -> io::Result<()> {
    transfer(file, bufs, offset, Direction::Write)
}

fn transfer(file: &File, bufs: &[RamBuffer], offset: u64, dir: Direction) -> io::Result<()> {
    let mut iov = iovec_array(bufs)?;
    iovecs(file, &mut iov[..bufs.len()], offset, dir)
}

/// The iovecs of `bufs`, in order, at the start of an array (no allocation).
fn iovec_array(bufs: &[RamBuffer]) -> io::Result<[libc::iovec; MAX_IOVECS]> {
    if bufs.len() > MAX_IOVECS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more buffers than a request may have",
        ));
    }
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut iov = [empty; MAX_IOVECS];
    for (slot, buf) in iov.iter_mut().zip(bufs) {
        *slot = buf.iovec();
    }
    Ok(iov)
}

/// Moves every byte `iov` describes, from `offset` on, looping over short transfers.
fn iovecs(
    file: &File,
    mut iov: &mut [libc::iovec],
    mut offset: u64,
    dir: Direction,
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    while !iov.is_empty() {
        let pos = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset overflows"))?;
        let count = iov.len() as libc::c_int;
        // SAFETY: every iovec describes memory that stays mapped for the life of the
        // process: guest RAM (RamBuffer, inside one region) or the static ZEROES, which
        // pwritev only reads. The kernel checks the rest.
        let n = unsafe {
            match dir {
                Direction::Read => libc::preadv(fd, iov.as_ptr(), count, pos),
                Direction::Write => libc::pwritev(fd, iov.as_ptr(), count, pos),
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            // The image shrank under us (something else truncated it).
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image ended early",
            ));
        }
        let mut done = n as usize;
        offset += done as u64;
        while let Some(first) = iov.first_mut() {
            if done < first.iov_len {
                first.iov_base = (first.iov_base as usize + done) as *mut libc::c_void;
                first.iov_len -= done;
                break;
            }
            done -= first.iov_len;
            iov = &mut iov[1..];
        }
    }
    Ok(())
}

/// Makes the image's written data stable (`fdatasync`).
pub fn flush(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: fdatasync on an open descriptor.
        if unsafe { libc::fdatasync(file.as_raw_fd()) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range overflows",
        ));
    };
    loop {
        // SAFETY: fallocate on an open descriptor; it changes only the file.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

/// Deallocates `[offset, offset + len)`, keeping the size: reads return zeros after.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        file,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// What a discard did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discarded {
    /// The hole was punched.
    Punched,
    /// The file system cannot punch holes: nothing was done (a discard is a hint).
    Ignored,
}

/// A discard: punches a hole where the file system can, else does nothing.
pub fn discard(file: &File, offset: u64, len: u64) -> io::Result<Discarded> {
    match punch_hole(file, offset, len) {
        Ok(()) => Ok(Discarded::Punched),
        Err(e) if unsupported(&e) => Ok(Discarded::Ignored),
        Err(e) => Err(e),
    }
}

/// How a range was zeroed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zeroed {
    /// `FALLOC_FL_ZERO_RANGE`: zeros, blocks stay allocated.
    ZeroRange,
    /// `FALLOC_FL_PUNCH_HOLE`: zeros, blocks deallocated.
    Punched,
    /// Zeros written with `pwritev`: the file system can do neither.
    Written,
}

/// Zeroes `[offset, offset + len)` so that reads return zeros. With `may_unmap` (the
/// guest's UNMAP flag) the blocks are deallocated (a punched hole); without it the range
/// is zeroed in place (`FALLOC_FL_ZERO_RANGE`) so a later write finds its blocks, and
/// where the file system lacks that (tmpfs) a hole is punched anyway: reads return zeros
/// either way, which is all the guest can observe. Where neither works, zeros are
/// written.
pub fn write_zeroes(file: &File, offset: u64, len: u64, may_unmap: bool) -> io::Result<Zeroed> {
    if !may_unmap {
        let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match fallocate(file, zero_range, offset, len) {
            Ok(()) => return Ok(Zeroed::ZeroRange),
            Err(e) if unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    match punch_hole(file, offset, len) {
        Ok(()) => return Ok(Zeroed::Punched),
        Err(e) if unsupported(&e) => {}
        Err(e) => return Err(e),
    }
    write_zero_bytes(file, offset, len)?;
    Ok(Zeroed::Written)
}

/// Writes `len` zero bytes from `offset`, up to 1 MiB per call.
fn write_zero_bytes(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    const PER_CALL: usize = 16;
    let chunk = ZEROES.len() as u64;
    let mut left = len;
    while left > 0 {
        let mut iov = [libc::iovec {
            iov_base: ZEROES.as_ptr() as *mut libc::c_void,
            iov_len: ZEROES.len(),
        }; PER_CALL];
        let bytes = left.min(chunk * PER_CALL as u64);
        let count = bytes.div_ceil(chunk) as usize;
        let tail = bytes - chunk * (count as u64 - 1);
        iov[count - 1].iov_len = tail as usize;
        iovecs(file, &mut iov[..count], offset, Direction::Write)?;
        offset += bytes;
        left -= bytes;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn temp(tag: &str, len: u64) -> (File, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("ebb-block-io-{}-{tag}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(len).unwrap();
        (f, p)
    }

    #[test]
    fn zero_bytes_cover_the_range_exactly() {
        let (f, p) = temp("zeros", 3 << 20);
        f.write_all_at(&vec![0xee; 3 << 20], 0).unwrap();
        let len = (1 << 20) + (64 << 10) * 3 + 512;
        write_zero_bytes(&f, 4096, len).unwrap();
        let mut back = vec![0u8; 3 << 20];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|b| *b == 0xee));
        assert!(back[4096..4096 + len as usize].iter().all(|b| *b == 0));
        assert!(back[4096 + len as usize..].iter().all(|b| *b == 0xee));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn zeroing_reads_back_zeros_whatever_the_method() {
        let (f, p) = temp("wz", 1 << 20);
        for (i, may_unmap) in [false, true].into_iter().enumerate() {
            f.write_all_at(&vec![0x11; 1 << 20], 0).unwrap();
            let how = write_zeroes(&f, 8192, 65536, may_unmap).unwrap();
            if may_unmap {
                assert_ne!(how, Zeroed::ZeroRange, "{i}");
            }
            let mut back = vec![0u8; 1 << 20];
            f.read_exact_at(&mut back, 0).unwrap();
            assert!(back[8192..8192 + 65536].iter().all(|b| *b == 0));
            assert!(back[..8192].iter().all(|b| *b == 0x11));
            assert!(back[8192 + 65536..].iter().all(|b| *b == 0x11));
        }
        std::fs::remove_file(p).unwrap();
    }
}
