//! The nested test host (L1): its boot files, QEMU, the lock that keeps one L1 on the
//! machine, the outer paths it must see, and the command that boots it.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{path_str, setup_err, Error};
use crate::paths;
use crate::util::{die_with_parent, find_in_path};

/// What booting L1 takes, prepared once per job (the lock is held while it lives).
pub struct L1 {
    qemu: PathBuf,
    files: TestHostFiles,
    /// Outer paths bound through L1's scratch mounts (see [`paths_to_keep`]).
    keep: Vec<PathBuf>,
    _lock: HostLock,
    /// Time spent waiting for the lock.
    pub lock_wait: Duration,
    /// Time spent finding QEMU and building or checking the boot files.
    pub prepare: Duration,
}

impl L1 {
    /// Takes the test host lock, then finds QEMU and the boot files (building them when
    /// needed); `needed` are the outer directories the job uses.
    pub fn prepare(needed: &[(&str, &Path)]) -> Result<L1, Error> {
        let keep = paths_to_keep(needed)?;
        let t0 = Instant::now();
        let lock = lock_test_host()?;
        let lock_wait = t0.elapsed();
        let qemu = ensure_qemu()?;
        let files = prepare_test_host_files()?;
        Ok(L1 {
            qemu,
            files,
            keep,
            _lock: lock,
            lock_wait,
            prepare: t0.elapsed() - lock_wait,
        })
    }

    /// The QEMU command that boots L1 for the job whose run directory is `dir`, its
    /// kvm-amd module loaded with `kvm_amd_params`.
    pub fn command(
        &self,
        memory_mib: u32,
        kvm_amd_params: &[String],
        dir: &Path,
    ) -> Result<Command, Error> {
        let files = &self.files;
        let keep = &self.keep;
        let dir_s = path_str(dir);
        if dir_s.contains([',', ' ', '\t', '\n', '"']) {
            return Err(Error::Setup(format!(
                "run directory {dir_s} contains a comma, quote or white space (QEMU -virtfs and \
             the kernel command line cannot carry it)"
            )));
        }
        let mut append = vec![
            "console=ttyS0".to_string(),
            "panic=-1".into(),
            // TCG is slow enough without speculative-execution mitigations.
            "mitigations=off".into(),
            // Keep the TSC clocksource: the watchdog would otherwise switch to HPET, whose
            // emulated reads are slow, when TCG's TSC looks unstable.
            "tsc=reliable".into(),
            format!("ebbth.out={dir_s}"),
        ];
        append.extend(kvm_amd_arg(kvm_amd_params)?);
        if !keep.is_empty() {
            let keep: Vec<String> = keep.iter().map(|p| path_str(p)).collect();
            append.push(format!("ebbth.keep={}", keep.join(",")));
        }
        if let Some(m) = &files.modtree {
            let m = path_str(m);
            if !m.contains(char::is_whitespace) {
                append.push(format!("ebbth.modtree={m}"));
            }
        }
        let mut cmd = Command::new(&self.qemu);
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"])
            .args(["-machine", "q35", "-m"])
            .arg(memory_mib.to_string())
            .args(["-nographic", "-no-reboot", "-monitor", "none"])
            .arg("-kernel")
            .arg(&files.kernel)
            .arg("-initrd")
            .arg(&files.initramfs)
            .arg("-append")
            .arg(append.join(" "))
            .args([
                "-virtfs",
                "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
            ])
            .arg("-virtfs")
            .arg(format!(
                "local,path={dir_s},mount_tag=out,security_model=none,multidevs=remap"
            ))
            .arg("-serial")
            .arg(format!("file:{dir_s}/console.log"))
            .stdin(Stdio::null());
        let qout = File::create(dir.join("qemu.log"))
            .map_err(setup_err(format!("creating {}/qemu.log", dir.display())))?;
        let qerr = qout
            .try_clone()
            .map_err(setup_err("duplicating the qemu.log handle"))?;
        cmd.stdout(qout).stderr(qerr);
        die_with_parent(&mut cmd);
        Ok(cmd)
    }
}

/// Holds the cross-process test host lock while alive.
struct HostLock {
    _file: File,
}

fn lock_test_host() -> Result<HostLock, Error> {
    let dir = paths::target_dir().join("testhost");
    fs::create_dir_all(&dir).map_err(setup_err(format!("creating {}", dir.display())))?;
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(setup_err(format!("opening {}", path.display())))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!(
            "[testhost] another process is using the test host; waiting for {}",
            path.display()
        );
        // SAFETY: as above.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(Error::Setup(format!(
                "flock {}: {}",
                path.display(),
                io::Error::last_os_error()
            )));
        }
    }
    Ok(HostLock { _file: file })
}

/// The L1 boot files made by resources/build-testhost.sh.
#[derive(Debug, Clone)]
pub struct TestHostFiles {
    pub dir: PathBuf,
    /// The kernel QEMU boots: the ELF vmlinux (PVH entry, no decompression under TCG)
    /// when present, else the bzImage.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The L1 kernel's full module tree (for `modprobe -d` inside L1), when known.
    pub modtree: Option<PathBuf>,
}

/// Builds (or finds up to date) the L1 boot files: runs resources/build-testhost.sh.
pub fn prepare_test_host_files() -> Result<TestHostFiles, Error> {
    let script = paths::resources_dir().join("build-testhost.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("EBB_CACHE_DIR", paths::cache_dir())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(setup_err(format!("running {}", script.display())))?;
    if !out.status.success() {
        return Err(Error::Setup(format!(
            "{} failed ({}); its messages are above",
            script.display(),
            out.status
        )));
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let initramfs = dir.join("initramfs.cpio.gz");
    let kernel = [dir.join("vmlinux"), dir.join("vmlinuz")]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Setup(format!("no vmlinux/vmlinuz in {}", dir.display())))?;
    if !initramfs.is_file() {
        return Err(Error::Setup(format!(
            "no initramfs.cpio.gz in {}",
            dir.display()
        )));
    }
    let modtree = fs::read_to_string(dir.join("modtree"))
        .ok()
        .map(|s| PathBuf::from(s.trim()))
        .filter(|p| p.is_dir());
    Ok(TestHostFiles {
        dir,
        kernel,
        initramfs,
        modtree,
    })
}

/// Finds qemu-system-x86_64 on PATH, or says how to install it.
pub fn find_qemu() -> Result<PathBuf, String> {
    find_in_path("qemu-system-x86_64").ok_or_else(|| {
        "qemu-system-x86_64 is not installed: install Debian's qemu-system-x86 \
         (`apt-get install qemu-system-x86`, or `ensure_packages qemu-system-x86` from \
         resources/common.sh) on the outer machine"
            .into()
    })
}

/// [`find_qemu`], installing Debian's qemu-system-x86 first when missing (on the outer
/// machine: inside L1 the root is read-only).
pub fn ensure_qemu() -> Result<PathBuf, Error> {
    if let Ok(p) = find_qemu() {
        return Ok(p);
    }
    let common = paths::resources_dir().join("common.sh");
    eprintln!("[testhost] qemu-system-x86_64 not found: installing qemu-system-x86");
    let status = Command::new("bash")
        .arg("-c")
        .arg(r#". "$1" && ensure_packages qemu-system-x86"#)
        .arg("ensure-qemu")
        .arg(&common)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(setup_err("running ensure_packages qemu-system-x86"))?;
    if !status.success() {
        return Err(Error::Setup(format!(
            "could not install qemu-system-x86 ({status}); install it with \
             `apt-get install qemu-system-x86`"
        )));
    }
    find_qemu().map_err(Error::Setup)
}

/// Directories L1's init covers with scratch tmpfs mounts of its own: outer paths under
/// them that a run needs are bound through (`ebbth.keep=`), see [`paths_to_keep`].
const SCRATCH_MOUNTS: &[&str] = &["/tmp", "/run", "/dev/shm"];
/// Directories L1 mounts its own kernel's views on: nothing of the outer machine there.
const L1_OWN_MOUNTS: &[&str] = &["/proc", "/sys", "/dev"];

/// Of the outer directories a run needs (`(what, path)`), those under L1's scratch
/// mounts, without the ones inside another: L1 binds each through from its view of the
/// outer root, so a checkout, target directory or cache under /tmp works as anywhere else.
fn paths_to_keep(needed: &[(&str, &Path)]) -> Result<Vec<PathBuf>, Error> {
    let mut keep: Vec<PathBuf> = Vec::new();
    for (what, p) in needed {
        let s = path_str(p);
        if !p.is_absolute() {
            return Err(Error::Setup(format!("{what} {s} is not absolute")));
        }
        if SCRATCH_MOUNTS.iter().any(|m| *p == Path::new(m)) {
            return Err(Error::Setup(format!(
                "{what} is {s} itself, which the test host replaces by a scratch tmpfs: use \
                 a directory below it or elsewhere"
            )));
        }
        if SCRATCH_MOUNTS.iter().any(|m| p.starts_with(m)) {
            if s.contains([',', ' ', '\t', '\n', '"']) {
                return Err(Error::Setup(format!(
                    "{what} {s} contains a comma, quote or white space (the test host's \
                     kernel command line cannot carry it)"
                )));
            }
            keep.push(p.to_path_buf());
        } else if let Some(m) = L1_OWN_MOUNTS.iter().find(|m| p.starts_with(m)) {
            return Err(Error::Setup(format!(
                "{what} {s} is under {m}, where the test host mounts its own kernel's view: \
                 use a directory elsewhere"
            )));
        }
    }
    keep.sort();
    keep.dedup();
    let all = keep.clone();
    keep.retain(|p| !all.iter().any(|q| q != p && p.starts_with(q)));
    Ok(keep)
}

/// L1's command-line word that its init turns into kvm-amd's module parameters
/// (`ebbth.kvm_amd=npt=0,avic=1`); `None` without parameters.
fn kvm_amd_arg(params: &[String]) -> Result<Option<String>, Error> {
    if let Some(bad) = params
        .iter()
        .find(|p| !p.contains('=') || p.contains([',', ' ', '\t', '\n', '"']))
    {
        return Err(Error::Setup(format!(
            "kvm-amd parameter {bad:?} is not NAME=VALUE without commas, quotes or white space"
        )));
    }
    Ok((!params.is_empty()).then(|| format!("ebbth.kvm_amd={}", params.join(","))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_amd_parameters_reach_l1_as_one_word_or_are_refused() {
        let arg = |ps: &[&str]| kvm_amd_arg(&ps.iter().map(|p| p.to_string()).collect::<Vec<_>>());
        assert_eq!(arg(&[]).unwrap(), None);
        assert_eq!(
            arg(&["npt=0", "avic=1"]).unwrap().as_deref(),
            Some("ebbth.kvm_amd=npt=0,avic=1")
        );
        assert!(arg(&["npt"]).is_err());
        assert!(arg(&["npt=0 nested=0"]).is_err());
        assert!(arg(&["a=1,b=2"]).is_err());
    }

    #[test]
    fn paths_under_scratch_mounts_are_kept() {
        let keep = |ps: &[&str]| {
            let v: Vec<(&str, &Path)> = ps.iter().map(|p| ("x", Path::new(*p))).collect();
            paths_to_keep(&v)
        };
        assert_eq!(
            keep(&["/tmp/c/target", "/work/cache", "/tmp/c", "/tmpfoo/a"]).unwrap(),
            vec![PathBuf::from("/tmp/c")]
        );
        assert_eq!(
            keep(&["/run/a", "/dev/shm/b"]).unwrap(),
            vec![PathBuf::from("/dev/shm/b"), PathBuf::from("/run/a")]
        );
        assert!(keep(&["rel"]).is_err());
        assert!(keep(&["/proc/1"]).is_err());
        assert!(keep(&["/tmp/a b"]).is_err());
    }
}
