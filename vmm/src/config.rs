//! What the user asked for: VM configuration values and their parsers.
//!
//! Parsing is strict: a value Ebb does not understand is an error with the offending text
//! in the message, never a silent default.

use std::fmt;
use std::path::PathBuf;

/// Bytes in a KiB/MiB/GiB/TiB.
pub const KIB: u64 = 1 << 10;
/// Bytes in a MiB.
pub const MIB: u64 = 1 << 20;
/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;
/// Bytes in a TiB.
pub const TIB: u64 = 1 << 40;

/// Guest page granularity for memory sizes.
pub const PAGE_SIZE: u64 = 4096;

/// Default guest memory.
pub const DEFAULT_MEMORY: u64 = 512 * MIB;
/// Default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";

/// A configuration value that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ParseError> {
    Err(ParseError(msg.into()))
}

/// Parses a size: plain bytes (`536870912`) or a number with a binary unit suffix
/// `K`, `M`, `G` or `T` (case-insensitive, optionally followed by `iB` or `B`), e.g.
/// `512M`, `5G`, `1024K`, `1.5G`, `2GiB`.
pub fn parse_size(text: &str) -> Result<u64, ParseError> {
    let s = text.trim();
    if s.is_empty() {
        return err("empty size (expected e.g. 512M, 5G, 1024K or a byte count)");
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit_lower = unit.to_ascii_lowercase();
    let multiplier = match unit_lower.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => TIB,
        _ => {
            return err(format!(
                "invalid size '{text}': unknown unit '{unit}' (use K, M, G or T)"
            ))
        }
    };
    if number.is_empty() {
        return err(format!("invalid size '{text}': no number"));
    }
    let bytes = if let Some((int, frac)) = number.split_once('.') {
        if multiplier == 1 {
            return err(format!("invalid size '{text}': fractional byte count"));
        }
        if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
            return err(format!("invalid size '{text}': not a number"));
        }
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse()
                .map_err(|_| ParseError(format!("invalid size '{text}': too large")))?
        };
        // Up to 9 fractional digits, in exact integer arithmetic.
        let digits = &frac[..frac.len().min(9)];
        let scale = 10u64.pow(digits.len() as u32);
        let frac_val: u64 = if digits.is_empty() {
            0
        } else {
            digits.parse().unwrap_or(0)
        };
        let whole = int.checked_mul(multiplier);
        let part = (u128::from(frac_val) * u128::from(multiplier) / u128::from(scale)) as u64;
        whole
            .and_then(|w| w.checked_add(part))
            .ok_or_else(|| ParseError(format!("invalid size '{text}': too large")))?
    } else {
        let n: u64 = number
            .parse()
            .map_err(|_| ParseError(format!("invalid size '{text}': too large")))?;
        n.checked_mul(multiplier)
            .ok_or_else(|| ParseError(format!("invalid size '{text}': too large")))?
    };
    Ok(bytes)
}

/// Formats a byte count the way a person reads it (`512 MiB`, `1.5 GiB`, `4096 bytes`).
pub fn format_size(bytes: u64) -> String {
    let units = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
    for (size, name) in units {
        if bytes >= size {
            if bytes % size == 0 {
                return format!("{} {name}", bytes / size);
            }
            return format!("{:.1} {name}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} bytes")
}

/// Parses `on`/`off` (also `true`/`false`, `yes`/`no`, `1`/`0`).
pub fn parse_switch(key: &str, value: &str) -> Result<bool, ParseError> {
    match value.to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" => Ok(true),
        "off" | "false" | "no" | "0" => Ok(false),
        _ => err(format!(
            "invalid value '{value}' for {key}: expected on or off"
        )),
    }
}

/// Splits `key=value,key=value` option lists; a bare first item is returned as the
/// positional value (`5G,thp=on` -> positional `5G`).
/// An option list: the optional positional value and the `key=value` pairs.
type OptionList<'a> = (Option<&'a str>, Vec<(&'a str, &'a str)>);

fn split_options(text: &str) -> Result<OptionList<'_>, ParseError> {
    let mut positional = None;
    let mut pairs = Vec::new();
    for (i, item) in text.split(',').enumerate() {
        let item = item.trim();
        if item.is_empty() {
            return err(format!("empty option in '{text}'"));
        }
        match item.split_once('=') {
            Some((k, v)) => pairs.push((k.trim(), v.trim())),
            None if i == 0 => positional = Some(item),
            None => {
                return err(format!(
                    "option '{item}' in '{text}' needs a value (key=value)"
                ))
            }
        }
    }
    Ok((positional, pairs))
}

/// Guest memory configuration (`--memory SIZE[,thp=on|off]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Guest RAM in bytes (a multiple of 4 KiB).
    pub size: u64,
    /// Transparent huge pages for guest RAM: `Some(true)` asks for them
    /// (`MADV_HUGEPAGE`), `Some(false)` refuses them (`MADV_NOHUGEPAGE`), `None` leaves the
    /// host's policy in charge.
    pub thp: Option<bool>,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: DEFAULT_MEMORY,
            thp: None,
        }
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
                _ => return err(format!("unknown memory option '{key}' (known: size, thp)")),
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
        Ok(cfg)
    }
}

/// Balloon device configuration (`--balloon size=...,deflate_on_oom=...,...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial balloon target in bytes.
    pub size: u64,
    /// Let the guest take pages back from the balloon under memory pressure.
    pub deflate_on_oom: bool,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
    /// Seconds between statistics requests; 0 disables the statistics queue.
    pub stats_interval_s: u32,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        Self {
            size: 0,
            deflate_on_oom: false,
            free_page_reporting: true,
            stats_interval_s: 0,
        }
    }
}

impl std::str::FromStr for BalloonConfig {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        let (positional, pairs) = split_options(text)?;
        let mut cfg = BalloonConfig::default();
        if let Some(p) = positional {
            cfg.size = parse_size(p)?;
        }
        for (key, value) in pairs {
            match key {
                "size" => cfg.size = parse_size(value)?,
                "deflate_on_oom" => cfg.deflate_on_oom = parse_switch(key, value)?,
                "free_page_reporting" => cfg.free_page_reporting = parse_switch(key, value)?,
                "stats_interval" => {
                    cfg.stats_interval_s = value.parse().map_err(|_| {
                        ParseError(format!(
                            "invalid stats_interval '{value}': expected whole seconds"
                        ))
                    })?
                }
                _ => {
                    return err(format!(
                        "unknown balloon option '{key}' (known: size, deflate_on_oom, \
                         free_page_reporting, stats_interval)"
                    ))
                }
            }
        }
        if cfg.size % PAGE_SIZE != 0 {
            return err(format!(
                "balloon size {} bytes is not a multiple of 4 KiB",
                cfg.size
            ));
        }
        Ok(cfg)
    }
}

/// Where the guest's serial console goes (`--serial`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// Output on stdout, input from stdin.
    #[default]
    Stdio,
    /// Output to a file; no input.
    File(PathBuf),
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
                Some(path) if !path.is_empty() => Ok(SerialConfig::File(PathBuf::from(path))),
                _ => err(format!(
                    "invalid serial '{text}': expected stdio, file=PATH or off"
                )),
            },
        }
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialConfig::Stdio => write!(f, "stdio"),
            SerialConfig::File(p) => write!(f, "file={}", p.display()),
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
    /// Optional REST API socket.
    pub api_socket: Option<PathBuf>,
    /// Serial console.
    pub serial: SerialConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_units() {
        assert_eq!(parse_size("512M").unwrap(), 512 * MIB);
        assert_eq!(parse_size("5G").unwrap(), 5 * GIB);
        assert_eq!(parse_size("1024K").unwrap(), MIB);
        assert_eq!(parse_size("536870912").unwrap(), 512 * MIB);
        assert_eq!(parse_size("2GiB").unwrap(), 2 * GIB);
        assert_eq!(parse_size("2gb").unwrap(), 2 * GIB);
        assert_eq!(parse_size("1.5G").unwrap(), 3 * GIB / 2);
        assert_eq!(parse_size("0.5M").unwrap(), MIB / 2);
        assert_eq!(parse_size("1T").unwrap(), TIB);
        assert_eq!(parse_size(" 64m ").unwrap(), 64 * MIB);
    }

    #[test]
    fn bad_sizes_say_why() {
        for bad in [
            "",
            "G",
            "12X",
            "1.2.3G",
            "1.5",
            "-1G",
            "5 G B",
            "99999999999999999999",
        ] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.0.contains("size"), "{bad}: {e}");
        }
        assert!(parse_size("20000000T").unwrap_err().0.contains("too large"));
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(512 * MIB), "512 MiB");
        assert_eq!(format_size(3 * GIB / 2), "1.5 GiB");
        assert_eq!(format_size(100), "100 bytes");
    }

    #[test]
    fn memory_config() {
        let m: MemoryConfig = "5G".parse().unwrap();
        assert_eq!(
            m,
            MemoryConfig {
                size: 5 * GIB,
                thp: None
            }
        );
        let m: MemoryConfig = "1G,thp=on".parse().unwrap();
        assert_eq!(m.thp, Some(true));
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
    fn balloon_config() {
        let b: BalloonConfig =
            "size=256M,deflate_on_oom=on,free_page_reporting=off,stats_interval=2"
                .parse()
                .unwrap();
        assert_eq!(
            b,
            BalloonConfig {
                size: 256 * MIB,
                deflate_on_oom: true,
                free_page_reporting: false,
                stats_interval_s: 2
            }
        );
        let d: BalloonConfig = "size=0".parse().unwrap();
        assert!(d.free_page_reporting, "reporting defaults on");
        assert!("size=1G,bogus=1".parse::<BalloonConfig>().is_err());
        assert!("stats_interval=-1".parse::<BalloonConfig>().is_err());
        assert!("size=1G,".parse::<BalloonConfig>().is_err());
        assert!("size=1G,deflate_on_oom".parse::<BalloonConfig>().is_err());
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
            SerialConfig::File("/tmp/x".into())
        );
        assert!("file=".parse::<SerialConfig>().is_err());
        assert!("tty".parse::<SerialConfig>().is_err());
    }
}
