//! Memory readings from /proc, read directly (no forking: a sampler that forks per sample
//! lags by seconds inside the emulated test host).

use std::io;

fn read(path: &str) -> io::Result<String> {
    std::fs::read_to_string(path).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn missing(what: &str, path: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("no {what} in {path}"))
}

/// Resident set size of a process (`VmRSS` of /proc/PID/status), in KiB.
pub fn process_rss_kib(pid: u32) -> io::Result<u64> {
    let path = format!("/proc/{pid}/status");
    kib_field(&read(&path)?, "VmRSS").ok_or_else(|| missing("VmRSS", &path))
}

/// `MemAvailable` of /proc/meminfo, in KiB.
/// Page faults a process has taken that needed no I/O (`minflt` of /proc/PID/stat): for
/// a VMM, mostly guest RAM being faulted in on the host.
pub fn minor_faults(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: count fields after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace()
        .nth(7)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::other(format!("no minflt in /proc/{pid}/stat")))
}

pub fn host_mem_available_kib() -> io::Result<u64> {
    let path = "/proc/meminfo";
    kib_field(&read(path)?, "MemAvailable").ok_or_else(|| missing("MemAvailable", path))
}

/// A named field of /proc/meminfo (e.g. `MemTotal`), in KiB.
pub fn meminfo_kib(key: &str) -> io::Result<u64> {
    let path = "/proc/meminfo";
    kib_field(&read(path)?, key).ok_or_else(|| missing(key, path))
}

/// One mapping of /proc/PID/smaps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    /// The path or pseudo-name (`[heap]`), empty for anonymous mappings.
    pub name: String,
    pub rss_kib: u64,
}

impl Mapping {
    pub fn size_bytes(&self) -> u64 {
        self.end - self.start
    }
}

fn parse_header(line: &str) -> Option<Mapping> {
    let mut fields = line.split_whitespace();
    let range = fields.next()?;
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    if perms.len() != 4 {
        return None;
    }
    let _offset = fields.next()?;
    let _dev = fields.next()?;
    let _inode = fields.next()?;
    let name = fields.collect::<Vec<_>>().join(" ");
    Some(Mapping {
        start,
        end,
        perms: perms.to_string(),
        name,
        rss_kib: 0,
    })
}

/// Parses the text of /proc/PID/smaps. A mapping's `rss_kib` is its `Rss` plus its
/// hugetlb pages (`Shared_Hugetlb`, `Private_Hugetlb`), which `Rss` leaves out.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let held = ["Rss:", "Shared_Hugetlb:", "Private_Hugetlb:"]
            .iter()
            .find_map(|f| line.strip_prefix(f));
        if let Some(rss) = held {
            if let (Some(last), Some(kib)) = (
                maps.last_mut(),
                rss.split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok()),
            ) {
                last.rss_kib += kib;
            }
        } else if line.as_bytes().first().is_some_and(u8::is_ascii_hexdigit) && line.contains('-') {
            // Field lines ("Size:", "Rss:", "VmFlags:") start with a letter that may be a
            // hex digit too ("AnonHugePages"), but only headers have the range form.
            if let Some(m) = parse_header(line) {
                maps.push(m);
            }
        }
    }
    maps
}

/// The mappings of a process.
pub fn smaps(pid: u32) -> io::Result<Vec<Mapping>> {
    Ok(parse_smaps(&read(&format!("/proc/{pid}/smaps"))?))
}

/// RSS of a VMM's guest RAM, in KiB: the `Rss` (hugetlb pages included) of the writable
/// mapping whose size equals `memory_bytes` exactly.
///
/// Ebb maps guest RAM as ONE mapping of exactly `--memory` bytes (private anonymous, or
/// shared for `backing=memfd|hugetlb`). QEMU 7.2
/// (`-M microvm`, `-m N`) was checked the same way: its RAM block is one anonymous
/// `rw-p` mapping of exactly N MiB (for 512 MiB, 3.5 GiB and 5 GiB; `qemu_ram_mmap` puts
/// a separate PROT_NONE guard page after it, so the block is not merged with neighbours);
/// the only other mapping that large is TCG's code buffer (`rwxp`), absent under KVM.
/// When several mappings match, the one with the largest RSS is taken.
pub fn guest_ram_rss_kib(pid: u32, memory_bytes: u64) -> io::Result<u64> {
    let maps = smaps(pid)?;
    find_guest_ram(&maps, memory_bytes)
        .map(|m| m.rss_kib)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "process {pid} has no rw private mapping of exactly {memory_bytes} bytes \
                     (guest RAM)"
                ),
            )
        })
}

/// The guest RAM mapping among `maps` (see [`guest_ram_rss_kib`]).
pub fn find_guest_ram(maps: &[Mapping], memory_bytes: u64) -> Option<&Mapping> {
    maps.iter()
        .filter(|m| {
            m.size_bytes() == memory_bytes && m.perms.starts_with("rw") && !m.perms.contains('x')
        })
        .max_by_key(|m| m.rss_kib)
}

/// Bytes the file behind a process's descriptor whose target contains `name` holds (its
/// allocated blocks), in KiB: for Ebb's memfd backings, `memfd:ebb-guest-ram`.
pub fn fd_allocated_kib(pid: u32, name: &str) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let dir = format!("/proc/{pid}/fd");
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if std::fs::read_link(&path).is_ok_and(|t| t.to_string_lossy().contains(name)) {
            return Ok(std::fs::metadata(&path)?.blocks() / 2);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("no descriptor of {name} in {dir}"),
    ))
}

/// Voluntary context switches (a thread going to sleep: one per wake-up of a worker
/// that waits for work) of the threads of `pid` named `comm`, summed; 0 if unreadable.
pub fn thread_switches(pid: u32, comm: &str) -> u64 {
    let dir = format!("/proc/{pid}/task");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    entries
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = std::fs::read_to_string(path.join("comm")).ok()?;
            if name.trim() != comm {
                return None;
            }
            let status = std::fs::read_to_string(path.join("status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// What each thread of `pid` is doing: name, state, the kernel function it waits in, the
/// system call it is in, and its kernel stack where readable (root): for a process that
/// stopped making progress.
pub fn thread_report(pid: u32) -> String {
    let dir = format!("/proc/{pid}/task");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return format!("{dir}: unreadable (the process is gone)\n");
    };
    let mut tids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    let mut out = String::new();
    for tid in tids {
        let read = |name: &str| {
            std::fs::read_to_string(format!("{dir}/{tid}/{name}"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".into())
        };
        // The state is the field after the parenthesised name.
        let stat = read("stat");
        let state = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        out.push_str(&format!(
            "thread {tid} {}: state {state}, wchan {}, syscall {}\n",
            read("comm"),
            read("wchan"),
            read("syscall"),
        ));
        let stack = read("stack");
        if stack != "?" && !stack.is_empty() {
            for line in stack.lines() {
                out.push_str(&format!("    {line}\n"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minor_faults_count_pages_this_process_touches() {
        let me = std::process::id();
        let before = minor_faults(me).unwrap();
        let touched = vec![1u8; 8 << 20];
        assert!(touched.iter().step_by(4096).all(|&b| b == 1));
        assert!(
            minor_faults(me).unwrap() > before,
            "8 MiB touched, no fault counted"
        );
        assert!(minor_faults(u32::MAX).is_err());
    }

    const SMAPS: &str = "\
55d0c0a00000-55d0c0a21000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  12 kB
7fdd8fe00000-7fddafe00000 rw-p 00000000 00:00 0 
Size:             524288 kB
KernelPageSize:        4 kB
Rss:              201234 kB
AnonHugePages:         0 kB
VmFlags: rd wr mr mw me ac sd 
7fddb0000000-7fddeffff000 rwxp 00000000 00:00 0 
Size:            1048572 kB
Rss:                 100 kB
7ffd1000-7ffd2000 r-xp 00000000 fd:01 1234    /usr/bin/qemu system
Size:                  4 kB
Rss:                   4 kB
";

    #[test]
    fn parses_smaps_and_finds_guest_ram() {
        let maps = parse_smaps(SMAPS);
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[0].name, "[heap]");
        assert_eq!(maps[3].name, "/usr/bin/qemu system");
        let ram = find_guest_ram(&maps, 512 << 20).unwrap();
        assert_eq!(ram.rss_kib, 201234);
        assert!(find_guest_ram(&maps, 1 << 30).is_none());
    }

    /// Ebb's memfd backings: a shared mapping; hugetlb pages counted outside `Rss`.
    #[test]
    fn finds_shared_and_hugetlb_guest_ram() {
        let text = "\
7f0000000000-7f0040000000 rw-s 00000000 00:01 77     /memfd:ebb-guest-ram (deleted)
Size:            1048576 kB
Rss:                   0 kB
Shared_Hugetlb:   262144 kB
Private_Hugetlb:    2048 kB
VmFlags: rd wr sh mr mw me ms dd ht
";
        let maps = parse_smaps(text);
        let ram = find_guest_ram(&maps, 1 << 30).unwrap();
        assert_eq!(ram.rss_kib, 264192);
        assert!(ram.name.starts_with("/memfd:ebb-guest-ram"));
    }

    #[test]
    fn reads_own_process() {
        let pid = std::process::id();
        assert!(process_rss_kib(pid).unwrap() > 0);
        assert!(host_mem_available_kib().unwrap() > 0);
        assert!(!smaps(pid).unwrap().is_empty());
        let threads = thread_report(pid);
        assert!(threads.contains(&format!("thread {pid} ")), "{threads}");
        assert!(threads.contains("state "), "{threads}");
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert!(thread_switches(pid, comm.trim()) > 0);
    }
}
