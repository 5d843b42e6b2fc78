//! What the user asked for: VM configuration values and their parsers.
//!
//! Parsing is strict: a value Ebb does not understand is an error with the offending text
//! in the message, never a silent default.
//!
//! Sizes, option lists, [`BalloonConfig`] and [`DiskConfig`] come from `ebb-api-model`,
//! which the API and `ebb-ctl` share; they are re-exported here.

use std::fmt;
use std::path::PathBuf;

pub use crate::seccomp::SeccompMode;
pub use ebb_devices::ram::Backing;

pub use ebb_api_model::options::{parse_switch, split_options, ParseError};
pub use ebb_api_model::units::{format_size, parse_size, GIB, MIB, PAGE_SIZE};
pub use ebb_api_model::{BalloonConfig, DiskConfig};

/// Default guest memory.
pub const DEFAULT_MEMORY: u64 = 512 * MIB;
/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

fn err<T>(msg: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(msg.into()))
}

/// Guest memory configuration
/// (`--memory SIZE[,thp=on|off][,backing=anon|memfd|hugetlb][,merge=on|off]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Guest RAM in bytes (a multiple of 4 KiB; of 2 MiB with the hugetlb backing).
    pub size: u64,
    /// Transparent huge pages for guest RAM: `Some(true)` asks for them
    /// (`MADV_HUGEPAGE`), `Some(false)` refuses them (`MADV_NOHUGEPAGE`), `None` leaves the
    /// host's policy in charge. Not with the hugetlb backing.
    pub thp: Option<bool>,
    /// Offer guest RAM to the host's same-page merging (KSM): identical pages across
    /// guests are stored once, at the cost of ksmd's scanning.
    pub merge: bool,
    /// What holds guest RAM in the host.
    pub backing: Backing,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: DEFAULT_MEMORY,
            thp: None,
            merge: false,
            backing: Backing::Anon,
        }
    }
}

fn parse_backing(value: &str) -> Result<Backing, ParseError> {
    match value {
        "anon" => Ok(Backing::Anon),
        "memfd" => Ok(Backing::Memfd),
        "hugetlb" => Ok(Backing::Hugetlb),
        _ => err(format!(
            "unknown memory backing '{value}' (known: anon, memfd, hugetlb)"
        )),
    }
}

impl std::str::FromStr for MemoryConfig {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        let (positional, pairs) = split_options(text)?;
        let mut cfg = MemoryConfig::default();
        let mut size_given = false;
        if let Some(p) = positional {
            cfg.size = parse_size(p)?;
            size_given = true;
        }
        for (key, value) in pairs {
            match key {
                "size" => {
                    cfg.size = parse_size(value)?;
                    size_given = true;
                }
                "thp" => cfg.thp = Some(parse_switch(key, value)?),
                "backing" => cfg.backing = parse_backing(value)?,
                "merge" => cfg.merge = parse_switch(key, value)?,
                _ => {
                    return err(format!(
                        "unknown memory option '{key}' (known: size, thp, backing, merge)"
                    ))
                }
            }
        }
        if !size_given {
            return err(format!("'{text}' gives no memory size"));
        }
        if cfg.size == 0 {
            return err("memory size must be greater than zero");
        }
        if cfg.size % PAGE_SIZE != 0 {
            return err(format!(
                "memory size {} bytes is not a multiple of 4 KiB (try {})",
                cfg.size,
                (cfg.size / PAGE_SIZE + 1) * PAGE_SIZE
            ));
        }
        if cfg.merge && cfg.backing != Backing::Anon {
            // KSM merges private anonymous memory only: the advice would be ignored.
            return err("merge=on works with backing=anon only (KSM merges private memory)");
        }
        if cfg.backing == Backing::Hugetlb {
            let huge = Backing::Hugetlb.page_size();
            if cfg.thp.is_some() {
                return err(
                    "thp= does not apply to backing=hugetlb (guest RAM is made of 2 MiB huge \
                     pages already)",
                );
            }
            if cfg.size % huge != 0 {
                return err(format!(
                    "memory size {} is not a multiple of 2 MiB, the huge page size of \
                     backing=hugetlb (try {})",
                    ebb_api_model::units::size_arg(cfg.size),
                    ebb_api_model::units::size_arg(cfg.size.next_multiple_of(huge))
                ));
            }
        }
        Ok(cfg)
    }
}

/// The default cap of `--serial file=PATH`: a guest must not fill the host's disk.
pub const DEFAULT_SERIAL_FILE_MAX: u64 = GIB;

/// Where the guest's serial console goes (`--serial`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// Output on stdout, input from stdin.
    #[default]
    Stdio,
    /// Output to a file, at most `max` bytes of it; no input.
    File {
        /// The file (created or truncated at start).
        path: PathBuf,
        /// Largest size the file may reach; past it output is dropped, after a line
        /// that says so.
        max: u64,
    },
    /// No console.
    Off,
}

impl std::str::FromStr for SerialConfig {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        match text {
            "stdio" => Ok(SerialConfig::Stdio),
            "off" => Ok(SerialConfig::Off),
            _ => match text.strip_prefix("file=") {
                Some(rest) => {
                    // `,max=` ends the path (a path may hold other commas).
                    let (path, max) = match rest.rsplit_once(",max=") {
                        Some((path, size)) => {
                            let max = parse_size(size).map_err(|e| {
                                ParseError::new(format!("invalid serial '{text}': max: {e}"))
                            })?;
                            if max == 0 {
                                return err(format!(
                                    "invalid serial '{text}': max must be above 0 (use \
                                     --serial off for no output)"
                                ));
                            }
                            (path, max)
                        }
                        None => (rest, DEFAULT_SERIAL_FILE_MAX),
                    };
                    if path.is_empty() {
                        return err(format!("invalid serial '{text}': the file path is empty"));
                    }
                    Ok(SerialConfig::File {
                        path: PathBuf::from(path),
                        max,
                    })
                }
                None => err(format!(
                    "invalid serial '{text}': expected stdio, file=PATH[,max=SIZE] or off"
                )),
            },
        }
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialConfig::Stdio => write!(f, "stdio"),
            SerialConfig::File { path, max } => write!(
                f,
                "file={},max={}",
                path.display(),
                ebb_api_model::units::size_arg(*max)
            ),
            SerialConfig::Off => write!(f, "off"),
        }
    }
}

/// Everything needed to build and run one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image: bzImage or ELF vmlinux.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line as given by the user.
    pub cmdline: String,
    /// Guest memory.
    pub memory: MemoryConfig,
    /// vCPU count.
    pub cpus: u32,
    /// Optional balloon device.
    pub balloon: Option<BalloonConfig>,
    /// Disks, in the order the guest sees them.
    pub disks: Vec<DiskConfig>,
    /// Optional REST API socket.
    pub api_socket: Option<PathBuf>,
    /// Serial console.
    pub serial: SerialConfig,
    /// System call filters for Ebb's threads.
    pub seccomp: SeccompMode,
    /// Testing only: hinted pages are discarded without the write check.
    pub unchecked_hinting: bool,
    /// Where to find KVM and the host's modules.
    pub host: crate::host::HostPaths,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_config() {
        let m: MemoryConfig = "5G".parse().unwrap();
        assert_eq!(
            m,
            MemoryConfig {
                size: 5 * GIB,
                thp: None,
                merge: false,
                backing: Backing::Anon,
            }
        );
        let m: MemoryConfig = "1G,backing=memfd,thp=off".parse().unwrap();
        assert_eq!((m.backing, m.thp), (Backing::Memfd, Some(false)));
        let m: MemoryConfig = "backing=hugetlb,size=6M".parse().unwrap();
        assert_eq!((m.backing, m.size), (Backing::Hugetlb, 6 * MIB));
        let e = "1G,backing=pmem".parse::<MemoryConfig>().unwrap_err().0;
        assert!(e.contains("unknown memory backing 'pmem'"), "{e}");
        let e = "1G,backing=hugetlb,thp=on"
            .parse::<MemoryConfig>()
            .unwrap_err()
            .0;
        assert!(e.contains("thp= does not apply to backing=hugetlb"), "{e}");
        let e = "1025M,backing=hugetlb"
            .parse::<MemoryConfig>()
            .unwrap_err()
            .0;
        assert!(e.contains("not a multiple of 2 MiB"), "{e}");
        let m: MemoryConfig = "1G,thp=on".parse().unwrap();
        assert_eq!(m.thp, Some(true));
        let m: MemoryConfig = "1G,merge=on".parse().unwrap();
        assert!(m.merge);
        assert!("1G,merge=maybe".parse::<MemoryConfig>().is_err());
        let e = "1G,merge=on,backing=memfd"
            .parse::<MemoryConfig>()
            .unwrap_err()
            .0;
        assert!(e.contains("merge=on works with backing=anon only"), "{e}");
        let m: MemoryConfig = "size=2G".parse().unwrap();
        assert_eq!(m.size, 2 * GIB);
        assert!("0"
            .parse::<MemoryConfig>()
            .unwrap_err()
            .0
            .contains("greater than zero"));
        assert!("1000"
            .parse::<MemoryConfig>()
            .unwrap_err()
            .0
            .contains("4 KiB"));
        assert!("1G,huge=on"
            .parse::<MemoryConfig>()
            .unwrap_err()
            .0
            .contains("unknown"));
        assert!("thp=on"
            .parse::<MemoryConfig>()
            .unwrap_err()
            .0
            .contains("no memory size"));
        assert!("1G,thp=maybe".parse::<MemoryConfig>().is_err());
    }

    #[test]
    fn serial_config() {
        assert_eq!(
            "stdio".parse::<SerialConfig>().unwrap(),
            SerialConfig::Stdio
        );
        assert_eq!("off".parse::<SerialConfig>().unwrap(), SerialConfig::Off);
        assert_eq!(
            "file=/tmp/x".parse::<SerialConfig>().unwrap(),
            SerialConfig::File {
                path: "/tmp/x".into(),
                max: DEFAULT_SERIAL_FILE_MAX
            }
        );
        let capped: SerialConfig = "file=/tmp/a,b,max=10M".parse().unwrap();
        assert_eq!(
            capped,
            SerialConfig::File {
                path: "/tmp/a,b".into(),
                max: 10 * MIB
            }
        );
        assert_eq!(capped.to_string().parse::<SerialConfig>().unwrap(), capped);
        assert!("file=".parse::<SerialConfig>().is_err());
        assert!("file=,max=1M".parse::<SerialConfig>().is_err());
        assert!("file=/x,max=0".parse::<SerialConfig>().is_err());
        assert!("file=/x,max=lots".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
    }
}
