//! Sizes: the binary units, parsing sizes as people write them (`512M`, `1.5G`, bytes),
//! and printing them back for people ([`format_size`]) or for a command line
//! ([`size_arg`]).

use crate::ParseError;

/// Bytes in a KiB.
pub const KIB: u64 = 1 << 10;
/// Bytes in a MiB.
pub const MIB: u64 = 1 << 20;
/// Bytes in a GiB.
pub const GIB: u64 = 1 << 30;
/// Bytes in a TiB.
pub const TIB: u64 = 1 << 40;

/// Guest page granularity for memory sizes (and the balloon's page size).
pub const PAGE_SIZE: u64 = 4096;

/// 4 KiB pages per MiB.
pub const PAGES_PER_MIB: u64 = MIB / PAGE_SIZE;

/// Parses a size: plain bytes (`536870912`) or a number with a binary unit suffix
/// `K`, `M`, `G` or `T` (case-insensitive, optionally followed by `iB` or `B`), e.g.
/// `512M`, `5G`, `1024K`, `1.5G`, `2GiB`.
pub fn parse_size(text: &str) -> Result<u64, ParseError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(ParseError::new(
            "empty size (expected e.g. 512M, 5G, 1024K or a byte count)",
        ));
    }
    let too_large = || ParseError(format!("invalid size '{text}': too large"));
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let multiplier = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => KIB,
        "m" | "mb" | "mib" => MIB,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => TIB,
        _ => {
            return Err(ParseError(format!(
                "invalid size '{text}': unknown unit '{unit}' (use K, M, G or T)"
            )))
        }
    };
    if number.is_empty() {
        return Err(ParseError(format!("invalid size '{text}': no number")));
    }
    let Some((int, frac)) = number.split_once('.') else {
        let n: u64 = number.parse().map_err(|_| too_large())?;
        return n.checked_mul(multiplier).ok_or_else(too_large);
    };
    if multiplier == 1 {
        return Err(ParseError(format!(
            "invalid size '{text}': fractional byte count"
        )));
    }
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
        return Err(ParseError(format!("invalid size '{text}': not a number")));
    }
    let int: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_large())?
    };
    // Up to 9 fractional digits, in exact integer arithmetic.
    let digits = &frac[..frac.len().min(9)];
    let scale = 10u64.pow(digits.len() as u32);
    let frac_val: u64 = if digits.is_empty() {
        0
    } else {
        digits.parse().unwrap_or(0)
    };
    let part = (u128::from(frac_val) * u128::from(multiplier) / u128::from(scale)) as u64;
    int.checked_mul(multiplier)
        .and_then(|w| w.checked_add(part))
        .ok_or_else(too_large)
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

/// Formats a byte count as a command-line SIZE that [`parse_size`] reads back exactly:
/// the largest unit that divides it (`64M`, `2G`, `1536K`), else plain bytes; `0` for 0.
pub fn size_arg(bytes: u64) -> String {
    let units = [(TIB, "T"), (GIB, "G"), (MIB, "M"), (KIB, "K")];
    match units
        .iter()
        .find(|(size, _)| bytes != 0 && bytes % size == 0)
    {
        Some((size, suffix)) => format!("{}{suffix}", bytes / size),
        None => bytes.to_string(),
    }
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
        assert_eq!(
            parse_size("12X").unwrap_err().to_string(),
            "invalid size '12X': unknown unit 'X' (use K, M, G or T)"
        );
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(512 * MIB), "512 MiB");
        assert_eq!(format_size(3 * GIB / 2), "1.5 GiB");
        assert_eq!(format_size(100), "100 bytes");
    }

    #[test]
    fn size_args_read_back_exactly() {
        for (bytes, text) in [
            (0, "0"),
            (4096, "4K"),
            (64 * MIB, "64M"),
            (1024 * MIB, "1G"),
            (3 * GIB / 2, "1536M"),
            (TIB, "1T"),
            (100, "100"),
        ] {
            assert_eq!(size_arg(bytes), text);
            assert_eq!(parse_size(text).unwrap(), bytes);
        }
    }
}
