//! Bad input on the `ebb` command line: every mistake gives exit status 1, ONE readable
//! line `ebb: error: ...` on stderr naming the problem, nothing on stdout, no panic and no
//! hang. These run the real binary directly (no guest is ever started): the kernels here
//! are synthetic boot headers, so nothing can boot even on a host with working KVM.
//!
//! The host checks (KVM missing, not permitted, PVM) are steered with the hidden flags
//! `--kvm-device` and `--sysfs-module-dir`. The limits that need a KVM that can run stock guests (`--cpus`
//! above KVM's limit, `--memory` above what the host can address) are checked for real in
//! the test host by the `cli-host-limits` scenario (tests/, run by `cargo test -p
//! ebb-tests --test boot`); here they must still fail cleanly with whatever this host
//! reports first.
//!
//! Permission checks run the binary as an unprivileged user: as root through
//! `setpriv --reuid=65534 --regid=65534 --clear-groups` (util-linux), otherwise directly.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const EBB: &str = env!("CARGO_BIN_EXE_ebb");
/// No bad input may take longer than this to be rejected.
const LIMIT: Duration = Duration::from_secs(30);
/// The unprivileged user and group for permission checks.
const NOBODY: u32 = 65534;

/// A scratch directory (mode 0755 so the unprivileged user can traverse it), removed on
/// drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ebb-cli-{}-{}-{tag}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn file(&self, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let p = self.path(name);
        fs::write(&p, bytes).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn dir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A synthetic bzImage: just a valid boot header (protocol 2.15, 64-bit entry) asking for
/// `init_size` bytes from 16 MiB up. It passes Ebb's header checks but cannot boot.
fn fake_bzimage(version: u16, xloadflags: u16, init_size: u32) -> Vec<u8> {
    let mut b = vec![0u8; 8192];
    b[0x1f1] = 4; // setup_sects
    b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    b[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
    b[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes()); // cmdline_size
    b[0x258..0x260].copy_from_slice(&(16u64 << 20).to_le_bytes()); // pref_address
    b[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
    b
}

/// A kernel whose header Ebb accepts: needs 16 MiB + 48 MiB + 16 MiB working room.
fn good_kernel(s: &Scratch) -> PathBuf {
    s.file("bzImage", &fake_bzimage(0x020f, 1, 48 << 20), 0o644)
}

/// A small initramfs (Ebb does not look inside).
fn good_initramfs(s: &Scratch) -> PathBuf {
    s.file("initramfs.cpio", b"070701", 0o644)
}

struct Run {
    argv: Vec<String>,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "command: {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.argv.join(" "),
            self.status,
            self.stdout,
            self.stderr
        )
    }

    /// The one-line error contract; returns the message after `ebb: error: `.
    fn expect_error(&self, needles: &[&str]) -> String {
        let d = self.describe();
        assert_eq!(self.status.code(), Some(1), "exit status must be 1\n{d}");
        assert!(self.stdout.is_empty(), "nothing may go to stdout\n{d}");
        assert!(
            !self.stderr.contains("panicked") && !self.stderr.contains("RUST_BACKTRACE"),
            "ebb panicked\n{d}"
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "stderr must be exactly one line\n{d}");
        assert!(self.stderr.ends_with('\n'), "the line must end\n{d}");
        let msg = lines[0]
            .strip_prefix("ebb: error: ")
            .unwrap_or_else(|| panic!("the line must start with `ebb: error: `\n{d}"));
        assert!(
            msg.len() >= 10 && msg.len() <= 400,
            "message length {}\n{d}",
            msg.len()
        );
        for n in needles {
            assert!(msg.contains(n), "message must mention {n:?}\n{d}");
        }
        msg.to_string()
    }
}

/// Runs `cmd` (stdin closed) and kills it if it takes longer than [`LIMIT`] (a hang is a
/// failure).
fn run_cmd(mut cmd: Command) -> Run {
    let argv: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {argv:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{argv:?} did not finish within {LIMIT:?}: ebb hangs on bad input");
        }
        thread::sleep(Duration::from_millis(10));
    };
    Run {
        argv,
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

fn ebb_cmd(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(EBB);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

fn ebb(args: &[&str]) -> Run {
    run_cmd(ebb_cmd(args, &[]))
}

fn ebb_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    run_cmd(ebb_cmd(args, env))
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 scratch path")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs ebb as an unprivileged user: through setpriv (with a copy of the binary the user
/// can execute) when this is root, directly otherwise.
fn ebb_unprivileged(s: &Scratch, args: &[&str], env: &[(&str, &str)]) -> Run {
    if !is_root() {
        return ebb_env(args, env);
    }
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .unwrap_or_else(|| {
            panic!(
                "setpriv is missing: these tests run as root and need it to drop to an \
                 unprivileged user; install util-linux (ci/setup.sh does)"
            )
        });
    let bin = s.path("ebb-copy");
    if !bin.exists() {
        fs::copy(EBB, &bin).unwrap_or_else(|e| panic!("copying {EBB}: {e}"));
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cmd = Command::new(setpriv);
    cmd.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(&bin)
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let run = run_cmd(cmd);
    assert!(
        !run.stderr.starts_with("setpriv:"),
        "setpriv itself failed\n{}",
        run.describe()
    );
    run
}

/// Facts about this host's KVM, to know which error ebb must report first once the
/// command line is valid.
#[derive(Debug, PartialEq)]
enum HostKvm {
    /// kvm_pvm is loaded and /dev/kvm opens: ebb must say PVM.
    Pvm,
    /// No /dev/kvm.
    Missing,
    /// /dev/kvm exists but this user cannot open it.
    Denied,
    /// A KVM ebb may use.
    Usable,
}

fn host_kvm() -> HostKvm {
    let dev = Path::new("/dev/kvm");
    if !dev.exists() {
        return HostKvm::Missing;
    }
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .is_err()
    {
        return HostKvm::Denied;
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return HostKvm::Pvm;
    }
    HostKvm::Usable
}

const PVM_TEXT: &str =
    "this host's KVM is PVM (module kvm_pvm), which cannot boot standard Linux guests";

// ---------------------------------------------------------------------------------------
// The kernel

#[test]
fn kernel_missing() {
    let s = Scratch::new("kmissing");
    let k = s.path("no-such-kernel");
    ebb(&["--kernel", p(&k)]).expect_error(&[&format!("kernel image '{}' not found", p(&k))]);
}

#[test]
fn kernel_is_a_directory() {
    let s = Scratch::new("kdir");
    let d = s.dir("kernel-dir");
    ebb(&["--kernel", p(&d)]).expect_error(&[
        &format!("'{}' is not a bootable x86_64 Linux kernel", p(&d)),
        "it is a directory",
    ]);
}

#[test]
fn kernel_unreadable_for_an_unprivileged_user() {
    let s = Scratch::new("kperm");
    let k = s.file("bzImage", &fake_bzimage(0x020f, 1, 48 << 20), 0o000);
    let i = good_initramfs(&s);
    ebb_unprivileged(&s, &["--kernel", p(&k), "--initramfs", p(&i)], &[]).expect_error(&[
        &format!("cannot read kernel image '{}'", p(&k)),
        "Permission denied",
    ]);
}

#[test]
fn not_a_kernel() {
    let s = Scratch::new("notk");
    let text = s.file("notes.txt", b"just some text, not a kernel\n", 0o644);
    ebb(&["--kernel", p(&text)]).expect_error(&[
        &format!("'{}' is not a bootable x86_64 Linux kernel", p(&text)),
        "no 'HdrS' boot header",
    ]);
    let empty = s.file("empty", b"", 0o644);
    ebb(&["--kernel", p(&empty)]).expect_error(&["is not a bootable x86_64 Linux kernel"]);
    // A 32-bit ELF file.
    let mut elf32 = vec![0u8; 64];
    elf32[..4].copy_from_slice(b"\x7fELF");
    elf32[4] = 1;
    elf32[5] = 1;
    let elf32 = s.file("elf32", &elf32, 0o644);
    ebb(&["--kernel", p(&elf32)]).expect_error(&["not 64-bit little-endian"]);
    // A bzImage too old for the 64-bit boot protocol.
    let old = s.file("old-bzImage", &fake_bzimage(0x0204, 0, 48 << 20), 0o644);
    ebb(&["--kernel", p(&old)]).expect_error(&["bzImage has no 64-bit entry point"]);
}

// ---------------------------------------------------------------------------------------
// The initramfs

#[test]
fn initramfs_missing_or_unreadable() {
    let s = Scratch::new("initrd");
    let k = good_kernel(&s);
    let missing = s.path("no-such-initramfs");
    ebb(&["--kernel", p(&k), "--initramfs", p(&missing)])
        .expect_error(&[&format!("initramfs '{}' not found", p(&missing))]);
    let dir = s.dir("initramfs-dir");
    ebb(&["--kernel", p(&k), "--initramfs", p(&dir)])
        .expect_error(&[&format!("cannot read initramfs '{}'", p(&dir)), "directory"]);
    let locked = s.file("locked.cpio", b"070701", 0o000);
    ebb_unprivileged(&s, &["--kernel", p(&k), "--initramfs", p(&locked)], &[]).expect_error(&[
        &format!("cannot read initramfs '{}'", p(&locked)),
        "Permission denied",
    ]);
}

// ---------------------------------------------------------------------------------------
// Memory and vCPUs

#[test]
fn memory_unparseable_or_zero() {
    let s = Scratch::new("mem");
    let k = good_kernel(&s);
    for (value, needle) in [
        ("lots", "invalid size 'lots'"),
        ("12X", "unknown unit 'X'"),
        ("1.2.3G", "invalid size '1.2.3G'"),
        ("99999999999999999999", "too large"),
        ("1G,thp=maybe", "invalid value 'maybe' for thp"),
        ("1G,huge=on", "unknown memory option 'huge'"),
        ("0", "memory size must be greater than zero"),
        ("0G", "memory size must be greater than zero"),
        ("1000", "not a multiple of 4 KiB"),
        ("1G,backing=pmem", "unknown memory backing 'pmem'"),
        ("1G,backing=", "unknown memory backing ''"),
        (
            "1G,backing=hugetlb,thp=on",
            "thp= does not apply to backing=hugetlb",
        ),
        (
            "1G,thp=off,backing=hugetlb",
            "thp= does not apply to backing=hugetlb",
        ),
        ("1023M,backing=hugetlb", "not a multiple of 2 MiB"),
    ] {
        ebb(&["--kernel", p(&k), "--memory", value]).expect_error(&[needle]);
    }
}

/// A hugetlb backing larger than the host's pool of free 2 MiB huge pages is refused
/// before anything is set up, with what the pool holds and how to grow it.
#[test]
fn hugetlb_beyond_the_hosts_pool() {
    let s = Scratch::new("hugetlb");
    let k = good_kernel(&s);
    let dir = "/sys/kernel/mm/hugepages/hugepages-2048kB";
    let read = |name: &str| -> Option<u64> {
        fs::read_to_string(format!("{dir}/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (Some(free), Some(resv)) = (read("free_hugepages"), read("resv_hugepages")) else {
        eprintln!("SKIPPED: no 2 MiB huge page pool on this host");
        return;
    };
    let pages = free.saturating_sub(resv) + 1;
    let memory = format!("{}M,backing=hugetlb", pages * 2);
    let msg = ebb(&["--kernel", p(&k), "--memory", &memory]).expect_error(&[
        "backing=hugetlb",
        &format!("needs {pages} free 2 MiB huge pages"),
        "nr_hugepages",
    ]);
    assert!(!msg.contains("KVM"), "checked before KVM: {msg}");
}

#[test]
fn memory_below_the_kernels_needs() {
    let s = Scratch::new("memsmall");
    let k = good_kernel(&s);
    // The header asks for 48 MiB from 16 MiB up: 64 MiB, plus 16 MiB working room.
    let msg = ebb(&["--kernel", p(&k), "--memory", "32M"]).expect_error(&[
        "guest memory 32 MiB is too small for this kernel and initramfs",
        "they need at least 80 MiB",
    ]);
    assert!(msg.contains("kernel 64 MiB"), "{msg}");
    // The initramfs counts too.
    let big = s.file("big.cpio", &vec![0u8; 40 << 20], 0o644);
    ebb(&[
        "--kernel",
        p(&k),
        "--initramfs",
        p(&big),
        "--memory",
        "100M",
    ])
    .expect_error(&[
        "is too small",
        "they need at least 120 MiB",
        "initramfs 40 MiB",
    ]);
}

#[test]
fn cpus_zero_or_not_a_number() {
    let s = Scratch::new("cpus");
    let k = good_kernel(&s);
    ebb(&["--kernel", p(&k), "--cpus", "0"]).expect_error(&["--cpus must be at least 1"]);
    ebb(&["--kernel", p(&k), "--cpus", "two"]).expect_error(&["--cpus", "two"]);
    ebb(&["--kernel", p(&k), "--cpus", "-1"]).expect_error(&["-1"]);
}

/// `--cpus` above KVM's limit and `--memory` above what the host can address need a KVM
/// that can run guests to be reached; the `cli-host-limits` scenario checks them in the
/// test host. Here: the error this host reports first, and still one clean line.
#[test]
fn host_limits_fail_cleanly_with_what_this_host_reports_first() {
    let s = Scratch::new("limits");
    let k = good_kernel(&s);
    let i = good_initramfs(&s);
    let kvm = host_kvm();
    for (opt, value, limit_text) in [
        (
            "--cpus",
            "4096",
            "--cpus 4096 is more than this host allows",
        ),
        (
            "--memory",
            "100T",
            "--memory 100 TiB is more than this host can address",
        ),
    ] {
        let run = ebb(&["--kernel", p(&k), "--initramfs", p(&i), opt, value]);
        let expected = match kvm {
            HostKvm::Pvm => PVM_TEXT,
            HostKvm::Missing => "/dev/kvm not found",
            HostKvm::Denied => "permission denied opening /dev/kvm",
            HostKvm::Usable => limit_text,
        };
        run.expect_error(&[expected]);
    }
}

#[test]
fn balloon_larger_than_memory() {
    let s = Scratch::new("balloon");
    let k = good_kernel(&s);
    ebb(&[
        "--kernel",
        p(&k),
        "--memory",
        "512M",
        "--balloon",
        "size=2G",
    ])
    .expect_error(&["--balloon size=2 GiB is larger than guest memory (512 MiB)"]);
    ebb(&["--kernel", p(&k), "--balloon", "size=1G,bogus=1"])
        .expect_error(&["unknown balloon option 'bogus'"]);
    ebb(&["--kernel", p(&k), "--balloon", "deflate_on_oom=maybe"])
        .expect_error(&["invalid value 'maybe' for deflate_on_oom"]);
}

#[test]
fn balloon_policy_settings_that_cannot_work() {
    let s = Scratch::new("policy");
    let k = good_kernel(&s);
    for (balloon, message) in [
        (
            "policy=auto",
            "policy=auto decides from the guest's statistics: add stats_interval=SECS",
        ),
        (
            "stats_interval=1,policy=auto,policy_headroom=1G",
            "--balloon: policy headroom 1024 MiB is not below guest memory (512 MiB)",
        ),
        (
            "stats_interval=1,policy_max=600M",
            "--balloon: policy max 600 MiB is above guest memory (512 MiB)",
        ),
        (
            "stats_interval=1,policy_min=300M,policy_max=200M",
            "policy_min 300M is above policy_max 200M",
        ),
        (
            "policy=sometimes",
            "invalid policy 'sometimes': expected auto or off",
        ),
    ] {
        ebb(&["--kernel", p(&k), "--memory", "512M", "--balloon", balloon])
            .expect_error(&[message]);
    }
}

// ---------------------------------------------------------------------------------------
// Disks
//
// Images are checked, de-duplicated and locked before KVM is opened; `--kvm-device
// /nonexistent` stops a run whose disks are all good right after that, with an error
// that is not about disks.

/// A sparse image of `len` bytes.
fn image(s: &Scratch, name: &str, len: u64, mode: u32) -> PathBuf {
    let p = s.path(name);
    let f = fs::File::create(&p).unwrap();
    f.set_len(len).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    p
}

/// Runs ebb with a good kernel and these `--disk` values, stopping at the KVM device.
fn ebb_disks(s: &Scratch, disks: &[&str]) -> Run {
    let k = good_kernel(s);
    let mut args = vec!["--kernel".to_string(), p(&k).to_string()];
    for d in disks {
        args.extend(["--disk".to_string(), d.to_string()]);
    }
    args.extend(["--kvm-device".to_string(), "/nonexistent".to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ebb(&args)
}

const NO_KVM: &str = "/nonexistent not found";

#[test]
fn good_disks_pass_the_checks() {
    let s = Scratch::new("disks-good");
    let a = image(&s, "a.img", 1 << 20, 0o644);
    let b = image(&s, "b.img", 4096, 0o444);
    ebb_disks(
        &s,
        &[
            &format!("path={},id=root", p(&a)),
            &format!("{},readonly=on", p(&b)),
        ],
    )
    .expect_error(&[NO_KVM]);
}

#[test]
fn disk_image_missing_a_directory_or_empty() {
    let s = Scratch::new("disks-missing");
    let missing = s.path("nope.img");
    ebb_disks(&s, &[&format!("path={}", p(&missing))])
        .expect_error(&[&format!("disk image '{}' not found", p(&missing))]);
    let dir = s.dir("dir.img");
    for ro in ["on", "off"] {
        ebb_disks(&s, &[&format!("path={},readonly={ro}", p(&dir))]).expect_error(&[&format!(
            "disk image '{}' is a directory, not a regular file or block device",
            p(&dir)
        )]);
    }
    let empty = image(&s, "empty.img", 0, 0o644);
    ebb_disks(&s, &[p(&empty)]).expect_error(&[&format!("disk image '{}' is empty", p(&empty))]);
    ebb_disks(&s, &["path=/dev/null,readonly=on"])
        .expect_error(&["disk image '/dev/null' is a character device"]);
}

#[test]
fn disk_image_size_not_whole_sectors() {
    let s = Scratch::new("disks-size");
    let odd = image(&s, "odd.img", (1 << 20) + 100, 0o644);
    ebb_disks(&s, &[p(&odd)]).expect_error(&[&format!(
        "disk image '{}' is 1048676 bytes, not a multiple of 512 (the sector size)",
        p(&odd)
    )]);
}

#[test]
fn disk_image_unreadable_or_unwritable_for_an_unprivileged_user() {
    let s = Scratch::new("disks-perm");
    let k = good_kernel(&s);
    let run = |disk: String| {
        ebb_unprivileged(
            &s,
            &[
                "--kernel",
                p(&k),
                "--disk",
                &disk,
                "--kvm-device",
                "/nonexistent",
            ],
            &[],
        )
    };
    let locked = image(&s, "locked.img", 4096, 0o000);
    for ro in ["on", "off"] {
        let how = if ro == "on" { "reading" } else { "writing" };
        run(format!("path={},readonly={ro}", p(&locked))).expect_error(&[&format!(
            "cannot open disk image '{}' for {how}: permission denied",
            p(&locked)
        )]);
    }
    // Readable but not writable: a writable disk is refused with the way out, a
    // read-only one passes.
    let shared = image(&s, "shared.img", 4096, 0o444);
    run(p(&shared).to_string()).expect_error(&[
        &format!(
            "cannot open disk image '{}' for writing: permission denied",
            p(&shared)
        ),
        "readonly=on",
    ]);
    run(format!("{},readonly=on", p(&shared))).expect_error(&[NO_KVM]);
}

#[test]
fn the_same_disk_image_twice() {
    let s = Scratch::new("disks-twice");
    let a = image(&s, "a.img", 4096, 0o644);
    let link = s.path("link.img");
    fs::hard_link(&a, &link).unwrap();
    let sym = s.path("sym.img");
    std::os::unix::fs::symlink(&a, &sym).unwrap();
    let dotted = format!("{}/./a.img", s.0.display());
    for (second, readonly) in [
        (p(&a).to_string(), false),
        (p(&link).to_string(), true),
        (p(&sym).to_string(), false),
        (dotted, true),
    ] {
        let ro = if readonly { "on" } else { "off" };
        ebb_disks(
            &s,
            &[
                &format!("path={},id=first", p(&a)),
                &format!("path={second},readonly={ro},id=second"),
            ],
        )
        .expect_error(&[&format!(
            "disk image '{second}' is the same file as '{}': each image may be attached once",
            p(&a)
        )]);
    }
}

/// Holds an open file description lock on `path` (shared or exclusive) until dropped.
struct HeldLock {
    _file: fs::File,
}

fn hold_lock(path: &Path, exclusive: bool) -> HeldLock {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(exclusive)
        .open(path)
        .unwrap();
    // SAFETY: a zeroed flock is valid; the fields that matter are set.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if exclusive {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: F_OFD_SETLK with a valid flock on our own descriptor.
    let rc = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_OFD_SETLK, &fl) };
    assert_eq!(
        rc,
        0,
        "locking {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    HeldLock { _file: f }
}

#[test]
fn a_disk_image_locked_by_another_process() {
    let s = Scratch::new("disks-locked");
    let img = image(&s, "busy.img", 4096, 0o644);
    let writer = hold_lock(&img, true);
    for ro in ["on", "off"] {
        ebb_disks(&s, &[&format!("path={},readonly={ro}", p(&img))]).expect_error(&[&format!(
            "disk image '{}' is locked by another process",
            p(&img)
        )]);
    }
    drop(writer);
    // Readers share an image; a writer needs it alone.
    let reader = hold_lock(&img, false);
    ebb_disks(&s, &[&format!("path={},readonly=on", p(&img))]).expect_error(&[NO_KVM]);
    ebb_disks(&s, &[p(&img)]).expect_error(&[
        &format!("disk image '{}' is locked by another process", p(&img)),
        "needs it alone",
    ]);
    drop(reader);
    ebb_disks(&s, &[p(&img)]).expect_error(&[NO_KVM]);
}

#[test]
fn disk_option_mistakes() {
    let s = Scratch::new("disks-opts");
    let a = image(&s, "a.img", 4096, 0o644);
    let b = image(&s, "b.img", 4096, 0o644);
    s.dir("sub");
    let a2 = image(&s, "sub/a.img", 4096, 0o644);
    ebb_disks(&s, &["readonly=on"]).expect_error(&["gives no disk image (path=IMAGE)"]);
    ebb_disks(&s, &[&format!("path={},cache=none", p(&a))])
        .expect_error(&["unknown disk option 'cache' (known: path, readonly, id)"]);
    ebb_disks(&s, &[&format!("path={},readonly=sometimes", p(&a))])
        .expect_error(&["invalid value 'sometimes' for readonly"]);
    ebb_disks(&s, &[&format!("path={},id=a-very-long-disk-name", p(&a))])
        .expect_error(&["invalid disk id 'a-very-long-disk-name': 1 to 20 characters"]);
    ebb_disks(&s, &[&format!("path={},id=my disk", p(&a))])
        .expect_error(&["invalid disk id 'my disk'"]);
    // Two disks named alike: by id=, or by file names that derive the same id.
    ebb_disks(
        &s,
        &[&format!("{},id=x", p(&a)), &format!("{},id=x", p(&b))],
    )
    .expect_error(&["both have the id 'x'", "id=NAME"]);
    ebb_disks(&s, &[p(&a), p(&a2)]).expect_error(&["both have the id 'a.img'"]);
    // More disks than interrupts.
    let many: Vec<String> = (0..19).map(|i| format!("{},id=d{i}", p(&a))).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    ebb_disks(&s, &many).expect_error(&["19 disks are more than Ebb can attach: at most 18"]);
}

// ---------------------------------------------------------------------------------------
// Other command-line mistakes

#[test]
fn command_line_mistakes() {
    let s = Scratch::new("args");
    let k = good_kernel(&s);
    ebb(&[]).expect_error(&["--kernel"]);
    ebb(&["--kernel", p(&k), "--frobnicate"]).expect_error(&["--frobnicate"]);
    ebb(&["--kernel", p(&k), "--serial", "tty"])
        .expect_error(&["invalid serial 'tty'", "stdio, file=PATH[,max=SIZE] or off"]);
    ebb(&["--kernel", p(&k), "--serial", "file=/tmp/x,max=0"])
        .expect_error(&["max must be above 0", "--serial off"]);
    ebb(&["--kernel", p(&k), "--serial", "file=/tmp/x,max=big"]).expect_error(&["max:"]);
    ebb(&["--kernel", p(&k), "--log-level", "loud"]).expect_error(&["loud"]);
    ebb(&["--kernel"]).expect_error(&["--kernel"]);
}

#[test]
fn help_and_version_still_work() {
    let help = ebb(&["--help"]);
    assert_eq!(help.status.code(), Some(0), "{}", help.describe());
    assert!(help.stdout.contains("--balloon"), "{}", help.describe());
    assert!(
        help.stdout
            .contains("--disk <path=IMAGE[,readonly=on|off][,id=NAME]>"),
        "{}",
        help.describe()
    );
    assert!(help.stderr.is_empty(), "{}", help.describe());
    let version = ebb(&["--version"]);
    assert_eq!(version.status.code(), Some(0), "{}", version.describe());
    assert!(version.stdout.starts_with("ebb "), "{}", version.describe());
}

// ---------------------------------------------------------------------------------------
// The host's KVM

#[test]
fn kvm_device_missing() {
    let s = Scratch::new("kvmmissing");
    let k = good_kernel(&s);
    let dev = s.path("no-kvm-here");
    ebb(&["--kernel", p(&k), "--kvm-device", p(&dev)]).expect_error(&[
        &format!("{} not found: this host has no KVM", p(&dev)),
        "kvm_intel or kvm_amd",
    ]);
    ebb(&["--kernel", p(&k), "--kvm-device", "/nonexistent"])
        .expect_error(&["/nonexistent not found: this host has no KVM"]);
    // The environment is not a way in: the variable tests once used is ignored.
    let msg = ebb_env(
        &["--kernel", p(&k), "--kvm-device", p(&dev)],
        &[("EBB_KVM_DEVICE", "/nonexistent")],
    )
    .expect_error(&[&format!("{} not found", p(&dev))]);
    assert!(!msg.contains("/nonexistent"), "{msg}");
}

#[test]
fn kvm_device_not_permitted() {
    let s = Scratch::new("kvmperm");
    let k = good_kernel(&s);
    let i = good_initramfs(&s);
    // A device node the user may not open (a mode 000 file stands in for it).
    let dev = s.file("kvm", b"", 0o000);
    ebb_unprivileged(
        &s,
        &[
            "--kernel",
            p(&k),
            "--initramfs",
            p(&i),
            "--kvm-device",
            p(&dev),
        ],
        &[],
    )
    .expect_error(&[
        &format!("permission denied opening {}", p(&dev)),
        "add your user to the 'kvm' group",
    ]);
    // The real /dev/kvm when its mode keeps other users out (the default: 0600 or 0660).
    if let Ok(meta) = fs::metadata("/dev/kvm") {
        if meta.permissions().mode() & 0o006 != 0o006 && is_root() {
            ebb_unprivileged(&s, &["--kernel", p(&k), "--initramfs", p(&i)], &[])
                .expect_error(&["permission denied opening /dev/kvm"]);
        }
    }
}

#[test]
fn pvm_host_is_reported() {
    let s = Scratch::new("pvm");
    let k = good_kernel(&s);
    let i = good_initramfs(&s);
    let with_pvm = s.dir("modules-pvm");
    fs::create_dir_all(with_pvm.join("kvm_pvm")).unwrap();
    let without = s.dir("modules-plain");
    fs::create_dir_all(without.join("kvm")).unwrap();
    // /dev/null opens read-write like a KVM device would, so the module check is reached
    // on any host.
    let args = ["--kernel", p(&k), "--initramfs", p(&i)];
    let steered = |modules: &Path| {
        let mut a = args.to_vec();
        a.extend(["--kvm-device", "/dev/null", "--sysfs-module-dir"]);
        a.push(p(modules));
        ebb(&a)
    };
    steered(&with_pvm).expect_error(&[PVM_TEXT, "hardware KVM (kvm_intel or kvm_amd)"]);
    // Control: without kvm_pvm the same device is not called PVM (it is not KVM at all).
    let msg = steered(&without).expect_error(&[]);
    assert!(!msg.contains("PVM"), "{msg}");
    // This host for real.
    match host_kvm() {
        HostKvm::Pvm => {
            ebb(&args).expect_error(&[PVM_TEXT]);
        }
        other => {
            // Not PVM: the module check must not fire on the real /sys/module.
            let mut a = args.to_vec();
            a.extend(["--kvm-device", "/dev/null"]);
            let msg = ebb(&a).expect_error(&[]);
            assert!(!msg.contains("PVM"), "{other:?}: {msg}");
        }
    }
}
