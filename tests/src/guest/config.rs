//! What to boot: the guest's configuration (memory, CPUs, balloon, kernel image, the kernel
//! command line) and the full VMM command for it.

use std::path::PathBuf;

use super::{GuestArtifacts, GuestError, Result, Vmm};

/// The command line every guest gets before [`GuestConfig::cmdline_extra`].
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1";
/// Kernel parameters that skip slow boot-time probing of hardware these VMMs do not have
/// (measured in the nested test host, Debian 6.1 guest, QEMU microvm):
/// - `pci=noearly`: the early AGP/GART aperture search reads the config space of every
///   PCI bus/device/function through ports 0xcf8/0xcfc, twice: ~3 s each.
/// - `initcall_blacklist=cmos_init`: without an RTC described in ACPI the kernel still
///   registers a legacy CMOS RTC and its probe spins on port 0x70/0x71 for ~10 s.
pub const BOOT_SPEEDUPS: &str = "pci=noearly initcall_blacklist=cmos_init";

/// The guest kernel image to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelImage {
    /// The default guest's bzImage.
    BzImage,
    /// The default guest's ELF vmlinux (PVH entry: nothing to decompress, which saves
    /// ~10 s per boot in the emulated test host).
    Elf,
    /// A kernel of your own.
    Path(PathBuf),
}

/// The balloon device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial balloon target (MiB).
    pub size_mib: u64,
    pub deflate_on_oom: bool,
    pub free_page_reporting: bool,
    /// Seconds between statistics requests; 0: none.
    pub stats_interval: u32,
    /// Ebb only: offer free page hinting.
    pub free_page_hinting: bool,
    /// Ebb only: back pages a short guest takes back before it gets them (Ebb's default).
    pub deflate_prefault: bool,
}

impl Default for BalloonConfig {
    fn default() -> Self {
        BalloonConfig {
            size_mib: 0,
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_interval: 0,
            free_page_hinting: false,
            deflate_prefault: true,
        }
    }
}

/// A guest to spawn.
#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub memory_mib: u64,
    pub cpus: u32,
    /// Appended to [`BASE_CMDLINE`] (after `quiet` and [`BOOT_SPEEDUPS`] when enabled).
    pub cmdline_extra: String,
    /// Adds `quiet` to the command line. Every console byte is a costly exit in the
    /// emulated test host (flushing the boot log took ~7 s there); the kernel still
    /// prints warnings and errors.
    pub quiet: bool,
    /// Adds [`BOOT_SPEEDUPS`]: boot-time probes that cost seconds in the emulated test
    /// host, where every port I/O exit of the guest is emulated twice over.
    pub boot_speedups: bool,
    pub balloon: Option<BalloonConfig>,
    /// Appended to the VMM's command line.
    pub extra_args: Vec<String>,
    /// `None`: the ELF kernel for QEMU (when built), the bzImage for Ebb.
    pub kernel: Option<KernelImage>,
    /// `None`: the default guest's initramfs.
    pub initramfs: Option<PathBuf>,
    /// Copy the console to stderr as it arrives. Default: `EBB_GUEST_ECHO` is set to
    /// something other than `0`.
    pub echo_console: bool,
    /// Ebb only: `--memory SIZE,thp=on|off` (`None`: the host's default).
    pub thp: Option<bool>,
    /// Same-page merging: Ebb's `--memory SIZE,merge=on|off`, QEMU's `-machine
    /// mem-merge=on|off` (QEMU defaults to on; the harness says it either way).
    pub merge: bool,
    /// Ebb only: `--memory SIZE,backing=NAME` (`None`: Ebb's default, anon).
    pub backing: Option<String>,
    /// virtio-blk disks, in order (the first is /dev/vda in the guest).
    pub disks: Vec<DiskSpec>,
}

/// A raw disk image given to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub readonly: bool,
    /// The serial the guest reads (`/sys/block/vdX/serial`): Ebb's `id=`, QEMU's `serial=`.
    pub id: String,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            memory_mib: 512,
            cpus: 1,
            cmdline_extra: String::new(),
            quiet: true,
            boot_speedups: true,
            balloon: None,
            extra_args: Vec::new(),
            kernel: None,
            initramfs: None,
            echo_console: std::env::var("EBB_GUEST_ECHO").is_ok_and(|v| !v.is_empty() && v != "0"),
            thp: None,
            merge: false,
            backing: None,
            disks: Vec::new(),
        }
    }
}

impl GuestConfig {
    /// The kernel command line this configuration gives the guest.
    pub fn cmdline(&self) -> String {
        let mut c = BASE_CMDLINE.to_string();
        if self.quiet {
            c.push_str(" quiet");
        }
        if self.boot_speedups {
            c.push(' ');
            c.push_str(BOOT_SPEEDUPS);
        }
        if !self.cmdline_extra.trim().is_empty() {
            c.push(' ');
            c.push_str(self.cmdline_extra.trim());
        }
        c
    }
}

/// The full command (program and arguments) for `vmm` and `config`.
pub fn vmm_command(
    vmm: &dyn Vmm,
    config: &GuestConfig,
    artifacts: &GuestArtifacts,
) -> Result<Vec<String>> {
    let kernel = match config
        .kernel
        .clone()
        .unwrap_or_else(|| vmm.default_kernel(artifacts))
    {
        KernelImage::BzImage => artifacts.vmlinuz.clone(),
        KernelImage::Elf => artifacts.vmlinux.clone().ok_or_else(|| {
            GuestError::Missing(format!(
                "no vmlinux in {}: rebuild the guest with resources/build-guest.sh",
                artifacts.dir.display()
            ))
        })?,
        KernelImage::Path(p) => p,
    };
    let initramfs = config
        .initramfs
        .clone()
        .unwrap_or_else(|| artifacts.initramfs.clone());
    let mut argv = vmm.argv(config, &kernel, &initramfs)?;
    argv.extend(config.extra_args.iter().cloned());
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::{Ebb, Qemu};

    fn artifacts() -> GuestArtifacts {
        GuestArtifacts {
            dir: "/c/guest".into(),
            vmlinuz: "/c/guest/vmlinuz".into(),
            vmlinux: Some("/c/guest/vmlinux".into()),
            initramfs: "/c/guest/initramfs.cpio.gz".into(),
            kver: None,
        }
    }

    #[test]
    fn ebb_command_line() {
        let cfg = GuestConfig {
            memory_mib: 1024,
            cpus: 2,
            cmdline_extra: "ebb.run=touch:8".into(),
            balloon: Some(BalloonConfig {
                size_mib: 64,
                deflate_on_oom: false,
                free_page_reporting: true,
                stats_interval: 2,
                free_page_hinting: false,
                deflate_prefault: true,
            }),
            ..GuestConfig::default()
        };
        let ebb = Ebb {
            binary: "/t/ebb".into(),
        };
        let argv = vmm_command(&ebb, &cfg, &artifacts()).unwrap();
        assert_eq!(argv[0], "/t/ebb");
        let joined = argv.join(" ");
        assert!(joined.contains("--kernel /c/guest/vmlinuz"));
        assert!(joined.contains("--memory 1024M --cpus 2 --serial stdio"));
        assert!(joined.contains(
            "--balloon size=64M,deflate_on_oom=off,free_page_reporting=on,stats_interval=2"
        ));
        let i = argv.iter().position(|a| a == "--cmdline").unwrap();
        assert_eq!(
            argv[i + 1],
            format!("console=ttyS0 panic=-1 quiet {BOOT_SPEEDUPS} ebb.run=touch:8")
        );
    }

    #[test]
    fn qemu_rejects_initial_balloon_size() {
        let cfg = GuestConfig {
            balloon: Some(BalloonConfig {
                size_mib: 64,
                ..BalloonConfig::default()
            }),
            ..GuestConfig::default()
        };
        let qemu = Qemu {
            binary: "/usr/bin/qemu-system-x86_64".into(),
        };
        assert!(matches!(
            vmm_command(&qemu, &cfg, &artifacts()),
            Err(GuestError::Unsupported(_))
        ));
    }
}
