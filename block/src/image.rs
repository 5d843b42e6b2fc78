//! Disk images: opening them, checking them, telling two names of one file apart, and
//! locking them, all before the guest starts.
//!
//! An image is a raw file (or a block device) whose bytes are the disk's sectors. A
//! read-only disk opens its image `O_RDONLY` and takes a shared lock; a writable one opens
//! it `O_RDWR` and takes an exclusive lock. The locks are open file description locks
//! (`F_OFD_SETLK`, whole file): a second Ebb (or anything else that takes fcntl locks)
//! cannot write an image one Ebb uses, nor read one that another writes. They go when the
//! descriptor closes, so a killed Ebb leaves none behind.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::protocol::SECTOR_SIZE;

/// Why an image cannot be used. Every message names the image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No such file.
    #[error("disk image '{}' not found", .0.display())]
    NotFound(PathBuf),
    /// The open failed (permissions, a read-only file system, ...).
    #[error("cannot open disk image '{}' for {}: {}{}", .path.display(),
        if *.write { "writing" } else { "reading" }, short(.source),
        if *.write && is_permission(.source) { " (attach it with readonly=on, or make it writable)" } else { "" })]
    Open {
        /// The image.
        path: PathBuf,
        /// Opened for writing.
        write: bool,
        /// The error.
        source: io::Error,
    },
    /// A directory, FIFO, socket or character device.
    #[error("disk image '{}' is a {kind}, not a regular file or block device", .path.display())]
    NotAnImage {
        /// The image.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// Zero bytes.
    #[error("disk image '{}' is empty", .0.display())]
    Empty(PathBuf),
    /// Not whole sectors.
    #[error("disk image '{}' is {size} bytes, not a multiple of 512 (the sector size)", .path.display())]
    NotWholeSectors {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The size could not be found.
    #[error("cannot find the size of disk image '{}': {}", .path.display(), short(.source))]
    Size {
        /// The image.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The same file given twice, under the same name or another.
    #[error("disk image '{}' is the same file as '{}': each image may be attached once", .path.display(), .first.display())]
    Duplicate {
        /// The second name.
        path: PathBuf,
        /// The first.
        first: PathBuf,
    },
    /// Another process holds a conflicting lock.
    #[error("disk image '{}' is locked by another process ({})", .path.display(),
        if *.write { "it has the image open; a writable disk needs it alone" }
        else { "it is writing the image" })]
    Locked {
        /// The image.
        path: PathBuf,
        /// A writable disk asked for the exclusive lock.
        write: bool,
    },
    /// Locking failed for another reason (a file system without locks, ...).
    #[error("cannot lock disk image '{}': {}", .path.display(), short(.source))]
    Lock {
        /// The image.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// An `io::Error` without the "(os error N)" suffix, lower case first.
fn short(e: &io::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(at) => &text[..at],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn is_permission(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
}

/// What makes two names the same image: the file's device and inode, or for a block
/// device the device it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// A regular file: (st_dev, st_ino).
    File(u64, u64),
    /// A block device: st_rdev.
    BlockDevice(u64),
}

/// An open, checked image.
#[derive(Debug)]
pub struct DiskImage {
    file: File,
    path: PathBuf,
    readonly: bool,
    size: u64,
    identity: Identity,
}

impl DiskImage {
    /// Opens `path` for reading (and writing unless `readonly`) and checks that it can be
    /// a disk: a regular file or block device of whole, non-zero sectors. Not locked yet
    /// ([`DiskImage::lock`]).
    pub fn open(path: &Path, readonly: bool) -> Result<Self, ImageError> {
        // O_NONBLOCK so that a FIFO given by mistake cannot hang the open; cleared below
        // (it means nothing for files and block devices anyway).
        let opened = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(path);
        let file = match opened {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ImageError::NotFound(path.to_path_buf()))
            }
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                return Err(ImageError::NotAnImage {
                    path: path.to_path_buf(),
                    kind: "directory",
                })
            }
            Err(source) => {
                return Err(ImageError::Open {
                    path: path.to_path_buf(),
                    write: !readonly,
                    source,
                })
            }
        };
        let size_err = |source| ImageError::Size {
            path: path.to_path_buf(),
            source,
        };
        let meta = file.metadata().map_err(size_err)?;
        let ft = meta.file_type();
        let identity = if ft.is_file() {
            Identity::File(meta.dev(), meta.ino())
        } else if ft.is_block_device() {
            Identity::BlockDevice(meta.rdev())
        } else {
            let kind = if ft.is_dir() {
                "directory"
            } else if ft.is_fifo() {
                "FIFO"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_char_device() {
                "character device"
            } else {
                "special file"
            };
            return Err(ImageError::NotAnImage {
                path: path.to_path_buf(),
                kind,
            });
        };
        // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns.
        unsafe {
            let fd = file.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
        // A block device's size is where its end is; a file's is its length.
        let size = if ft.is_file() {
            meta.len()
        } else {
            (&file).seek(SeekFrom::End(0)).map_err(size_err)?
        };
        if size == 0 {
            return Err(ImageError::Empty(path.to_path_buf()));
        }
        if size % SECTOR_SIZE != 0 {
            return Err(ImageError::NotWholeSectors {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
            readonly,
            size,
            identity,
        })
    }

    /// Takes the image's lock: shared for a read-only disk, exclusive for a writable one.
    pub fn lock(&self) -> Result<(), ImageError> {
        let kind = if self.readonly {
            libc::F_RDLCK
        } else {
            libc::F_WRLCK
        };
        // SAFETY: a zeroed flock is valid; the fields that matter are set below.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = kind as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = 0;
        fl.l_len = 0; // the whole file, however it grows
        fl.l_pid = 0; // required for OFD locks
                      // SAFETY: F_OFD_SETLK with a valid flock on a descriptor this struct owns.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Err(ImageError::Locked {
                path: self.path.clone(),
                write: !self.readonly,
            }),
            _ => Err(ImageError::Lock {
                path: self.path.clone(),
                source: e,
            }),
        }
    }

    /// The open image.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The path it was opened as.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opened read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// Size in bytes (a non-zero multiple of 512).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Size in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Which file (or device) this is.
    pub fn identity(&self) -> Identity {
        self.identity
    }
}

/// Opens each `(path, readonly)` in order, refuses an image given twice (by identity,
/// not by name), then locks them all: the first problem is the error.
pub fn open_images(images: &[(PathBuf, bool)]) -> Result<Vec<DiskImage>, ImageError> {
    let mut opened: Vec<DiskImage> = Vec::with_capacity(images.len());
    for (path, readonly) in images {
        let image = DiskImage::open(path, *readonly)?;
        if let Some(first) = opened.iter().find(|o| o.identity == image.identity) {
            return Err(ImageError::Duplicate {
                path: path.clone(),
                first: first.path.clone(),
            });
        }
        opened.push(image);
    }
    // Locks last: an OFD lock conflicts with another descriptor of this process too, so
    // a duplicate would otherwise read as "locked by another process".
    for image in &opened {
        image.lock()?;
    }
    Ok(opened)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            static SEQ: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "ebb-block-image-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn file(&self, name: &str, len: u64) -> PathBuf {
            let p = self.0.join(name);
            let f = File::create(&p).unwrap();
            f.set_len(len).unwrap();
            p
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn os_errors_read_as_a_phrase() {
        let e = io::Error::from_raw_os_error(libc::EACCES);
        assert_eq!(short(&e), "permission denied");
        assert_eq!(short(&io::Error::other("Odd")), "odd");
    }

    #[test]
    fn a_good_image_opens_with_its_size() {
        let s = Scratch::new();
        let p = s.file("disk.img", 1 << 20);
        let d = DiskImage::open(&p, false).unwrap();
        assert_eq!(
            (d.size(), d.sectors(), d.readonly()),
            (1 << 20, 2048, false)
        );
        d.lock().unwrap();
        let r = DiskImage::open(&p, true).unwrap();
        assert!(r.readonly());
        assert_eq!(r.identity(), d.identity());
    }

    #[test]
    fn bad_images_are_refused_with_their_name() {
        let s = Scratch::new();
        let missing = s.0.join("nope.img");
        let e = DiskImage::open(&missing, true).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("disk image '{}' not found", missing.display())
        );
        let odd = s.file("odd.img", 1000);
        let e = DiskImage::open(&odd, false).unwrap_err().to_string();
        assert!(
            e.ends_with("is 1000 bytes, not a multiple of 512 (the sector size)"),
            "{e}"
        );
        let empty = s.file("empty.img", 0);
        assert!(DiskImage::open(&empty, true)
            .unwrap_err()
            .to_string()
            .ends_with("is empty"));
        for readonly in [true, false] {
            let e = DiskImage::open(&s.0, readonly).unwrap_err().to_string();
            assert!(e.contains("is a directory, not a regular file"), "{e}");
        }
        let e = DiskImage::open(Path::new("/dev/null"), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is a character device"), "{e}");
    }

    #[test]
    fn the_same_file_under_two_names_is_refused() {
        let s = Scratch::new();
        let a = s.file("a.img", 4096);
        let b = s.0.join("b.img");
        std::fs::hard_link(&a, &b).unwrap();
        let other = s.file("c.img", 4096);
        let e = open_images(&[(a.clone(), true), (other, false), (b.clone(), false)])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "disk image '{}' is the same file as '{}': each image may be attached once",
                b.display(),
                a.display()
            )
        );
        let dotted = s.0.join(".").join("a.img");
        assert!(matches!(
            open_images(&[(a.clone(), true), (dotted, true)]),
            Err(ImageError::Duplicate { .. })
        ));
    }

    /// OFD locks conflict between descriptors even within one process, which stands in
    /// for a second Ebb here.
    #[test]
    fn locks_keep_a_second_writer_out() {
        let s = Scratch::new();
        let p = s.file("disk.img", 4096);
        let first = open_images(&[(p.clone(), false)]).unwrap();
        for readonly in [false, true] {
            let e = open_images(&[(p.clone(), readonly)]).unwrap_err();
            assert!(matches!(e, ImageError::Locked { .. }), "{e}");
            assert!(
                e.to_string().contains("is locked by another process"),
                "{e}"
            );
        }
        drop(first);
        // Readers share.
        let r1 = open_images(&[(p.clone(), true)]).unwrap();
        let r2 = open_images(&[(p.clone(), true)]).unwrap();
        assert!(
            open_images(&[(p.clone(), false)]).is_err(),
            "no writer beside readers"
        );
        drop((r1, r2));
        open_images(&[(p, false)]).unwrap();
    }
}
