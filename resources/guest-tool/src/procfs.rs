//! Pure parsers for /proc and /sys text.

/// The /proc/meminfo fields the protocol reports, in KiB.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemInfo {
    pub total_kib: Option<u64>,
    pub free_kib: Option<u64>,
    pub available_kib: Option<u64>,
}

/// Value of one `Key:   123 kB` line of /proc/meminfo.
pub fn meminfo_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let mut words = v.split_whitespace();
        let n: u64 = words.next()?.parse().ok()?;
        match words.next() {
            None | Some("kB") => Some(n),
            Some(_) => None,
        }
    })
}

pub fn parse_meminfo(text: &str) -> MemInfo {
    MemInfo {
        total_kib: meminfo_field(text, "MemTotal"),
        free_kib: meminfo_field(text, "MemFree"),
        available_kib: meminfo_field(text, "MemAvailable"),
    }
}

/// Value of one `key 123` line of /proc/vmstat.
pub fn vmstat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? != key {
            return None;
        }
        words.next()?.parse().ok()
    })
}

/// Pages currently in the balloon: balloon_inflate - balloon_deflate (None without the
/// counters, i.e. a kernel without CONFIG_MEMORY_BALLOON).
pub fn balloon_pages(vmstat: &str) -> Option<i64> {
    let inflate = vmstat_field(vmstat, "balloon_inflate")?;
    let deflate = vmstat_field(vmstat, "balloon_deflate")?;
    Some(inflate as i64 - deflate as i64)
}

/// Number of CPUs in a sysfs CPU list such as `0-3,5,7-8`; None if malformed.
/// The all-CPU line of /proc/stat: user, nice, system, idle, iowait, irq, softirq, steal
/// (in USER_HZ ticks); fields a kernel does not have read as 0.
pub fn cpu_ticks(stat: &str) -> Option<[u64; 8]> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let mut out = [0u64; 8];
    for (slot, word) in out.iter_mut().zip(line.split_whitespace().skip(1)) {
        *slot = word.parse().ok()?;
    }
    Some(out)
}

pub fn cpulist_count(list: &str) -> Option<u32> {
    let list = list.trim();
    if list.is_empty() {
        return Some(0);
    }
    let mut n = 0u32;
    for part in list.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a {
                    return None;
                }
                n += b - a + 1;
            }
            None => {
                part.parse::<u32>().ok()?;
                n += 1;
            }
        }
    }
    Some(n)
}

/// Whether bit `bit` is set in a virtio sysfs `features` string (one '0'/'1' per bit,
/// bit 0 first).
pub fn feature_bit(features: &str, bit: usize) -> bool {
    features.trim().as_bytes().get(bit) == Some(&b'1')
}

/// Parses a sysfs virtio `device` id such as `0x0005`.
pub fn parse_hex_id(s: &str) -> Option<u32> {
    let s = s.trim();
    let digits = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X"))?;
    u32::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_ticks() {
        let stat = "cpu  10 1 20 300 4 5 6 7 0 0\ncpu0 10 1 20 300 4 5 6 7 0 0\nintr 1\n";
        assert_eq!(cpu_ticks(stat), Some([10, 1, 20, 300, 4, 5, 6, 7]));
        assert_eq!(cpu_ticks("cpu  1 2 3 4\n"), Some([1, 2, 3, 4, 0, 0, 0, 0]));
        assert_eq!(cpu_ticks("cpu0 1 2\n"), None);
        assert_eq!(cpu_ticks("cpu  1 x\n"), None);
    }

    const MEMINFO: &str = "MemTotal:        1004436 kB\n\
MemFree:          912345 kB\n\
MemAvailable:     900000 kB\n\
Buffers:               0 kB\n\
HugePages_Total:       0\n\
MemTotalish:          12 kB\n";

    #[test]
    fn parses_meminfo() {
        assert_eq!(
            parse_meminfo(MEMINFO),
            MemInfo {
                total_kib: Some(1004436),
                free_kib: Some(912345),
                available_kib: Some(900000),
            }
        );
        assert_eq!(meminfo_field(MEMINFO, "HugePages_Total"), Some(0));
        assert_eq!(meminfo_field(MEMINFO, "Missing"), None);
        assert_eq!(parse_meminfo(""), MemInfo::default());
        assert_eq!(meminfo_field("MemTotal: x kB\n", "MemTotal"), None);
    }

    #[test]
    fn parses_vmstat() {
        let v = "nr_free_pages 1234\nballoon_inflate 300\nballoon_deflate 44\nballoon_migrate 0\n";
        assert_eq!(vmstat_field(v, "nr_free_pages"), Some(1234));
        assert_eq!(vmstat_field(v, "balloon"), None);
        assert_eq!(balloon_pages(v), Some(256));
        assert_eq!(balloon_pages("nr_free_pages 1\n"), None);
        assert_eq!(
            balloon_pages("balloon_inflate 1\nballoon_deflate 3\n"),
            Some(-2)
        );
    }

    #[test]
    fn counts_cpulists() {
        assert_eq!(cpulist_count("0\n"), Some(1));
        assert_eq!(cpulist_count("0-1"), Some(2));
        assert_eq!(cpulist_count("0-3,5,7-8\n"), Some(7));
        assert_eq!(cpulist_count(""), Some(0));
        assert_eq!(cpulist_count("3-1"), None);
        assert_eq!(cpulist_count("a"), None);
    }

    #[test]
    fn reads_feature_bits() {
        let f = "0110010000000000000000000000000010110000000000000000000000000000\n";
        assert!(!feature_bit(f, 0));
        assert!(feature_bit(f, 1));
        assert!(feature_bit(f, 2));
        assert!(feature_bit(f, 5));
        assert!(feature_bit(f, 32));
        assert!(!feature_bit(f, 200));
        assert_eq!(parse_hex_id("0x0005\n"), Some(5));
        assert_eq!(parse_hex_id("5"), None);
    }
}
