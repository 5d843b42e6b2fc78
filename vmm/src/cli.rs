//! The `ebb` command line.

use std::path::PathBuf;

use clap::Parser;

use crate::host::{self, HostPaths};

use crate::config::{
    BalloonConfig, DiskConfig, MemoryConfig, SeccompMode, SerialConfig, VmConfig, DEFAULT_CMDLINE,
};

/// Ebb: a small VMM that gives guests' free memory back to the host.
#[derive(Debug, Parser)]
#[command(name = "ebb", version, about, long_about = None)]
pub struct Cli {
    /// Kernel image: a bzImage or an ELF vmlinux.
    #[arg(long, value_name = "PATH")]
    pub kernel: PathBuf,

    /// Initramfs (cpio archive, compressed or not).
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Guest memory: SIZE (512M, 5G, 1024K or bytes), optionally `,thp=on|off` to ask for
    /// or refuse transparent huge pages, and `,backing=` what holds it: anon (private
    /// anonymous memory, the default), memfd (shared memory, as vhost-user and snapshots
    /// need) or hugetlb (2 MiB huge pages from the host's pool: SIZE a multiple of 2 MiB,
    /// no thp=). Every backing gives memory back to the host (balloon, reporting,
    /// hinting); hugetlb in whole 2 MiB pages only. `,merge=on` offers it to the host's
    /// same-page merging (KSM).
    #[arg(
        long,
        value_name = "SIZE[,thp=on|off][,backing=anon|memfd|hugetlb][,merge=on|off]",
        default_value = "512M"
    )]
    pub memory: MemoryConfig,

    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub cpus: u32,

    /// Add a virtio-balloon device: size (the initial target), deflate_on_oom=on|off,
    /// free_page_reporting=on|off, stats_interval=SECS, free_page_hinting=on|off,
    /// deflate_prefault=on|off, policy=auto|off and its policy_* knobs (README "Command
    /// line" has them all).
    #[arg(long, value_name = "size=SIZE[,OPTION=VALUE]...")]
    pub balloon: Option<BalloonConfig>,

    /// Add a virtio-blk disk backed by a raw image (a file or block device whose size is
    /// a multiple of 512). Repeat for more disks; the guest sees them in this order.
    /// `id` (default: from the file name) is the disk's serial number.
    #[arg(long = "disk", value_name = "path=IMAGE[,readonly=on|off][,id=NAME]")]
    pub disks: Vec<DiskConfig>,

    /// Serve the REST API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Serial console: stdio, file=PATH (at most max=SIZE of output, default 1G) or off.
    #[arg(
        long,
        value_name = "stdio|file=PATH[,max=SIZE]|off",
        default_value = "stdio"
    )]
    pub serial: SerialConfig,

    /// System call filters for Ebb's threads: on (the default) or off, to debug a
    /// forbidden call.
    #[arg(long, value_name = "on|off", default_value = "on")]
    pub seccomp: SeccompMode,

    /// Testing only: the KVM device node to open.
    #[arg(long, value_name = "PATH", default_value = host::DEFAULT_KVM_DEVICE, hide = true)]
    pub kvm_device: PathBuf,

    /// Testing only: a directory standing in for /sys/module in the PVM check.
    #[arg(long, value_name = "PATH", default_value = host::DEFAULT_MODULE_DIR, hide = true)]
    pub sysfs_module_dir: PathBuf,

    /// Testing only: discard hinted free pages without checking that the guest has not
    /// written them again (loses such writes; shows the race the default closes).
    #[arg(long, hide = true)]
    pub unsafe_unchecked_hinting: bool,

    /// Log level for Ebb's own messages on stderr: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    pub log_level: tracing::Level,
}

impl Cli {
    /// The VM configuration this command line describes.
    pub fn vm_config(&self) -> VmConfig {
        VmConfig {
            kernel: self.kernel.clone(),
            initramfs: self.initramfs.clone(),
            cmdline: self.cmdline.clone(),
            memory: self.memory,
            cpus: self.cpus,
            balloon: self.balloon,
            disks: self.disks.clone(),
            api_socket: self.api_socket.clone(),
            serial: self.serial.clone(),
            seccomp: self.seccomp,
            unchecked_hinting: self.unsafe_unchecked_hinting,
            host: HostPaths {
                kvm_device: self.kvm_device.clone(),
                module_dir: self.sysfs_module_dir.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{GIB, MIB};

    #[test]
    fn defaults() {
        let cli = Cli::try_parse_from(["ebb", "--kernel", "k"]).unwrap();
        let c = cli.vm_config();
        assert_eq!(c.memory.size, 512 * MIB);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.cmdline, "console=ttyS0 panic=-1");
        assert_eq!(c.serial, SerialConfig::Stdio);
        assert!(c.balloon.is_none() && c.api_socket.is_none() && c.initramfs.is_none());
        assert!(c.disks.is_empty());
        assert_eq!(cli.log_level, tracing::Level::WARN);
    }

    #[test]
    fn all_options() {
        let cli = Cli::try_parse_from([
            "ebb",
            "--kernel",
            "k",
            "--initramfs",
            "i",
            "--cmdline",
            "console=ttyS0 quiet",
            "--memory",
            "5G,backing=memfd",
            "--cpus",
            "2",
            "--balloon",
            "size=1G,deflate_on_oom=on",
            "--api-socket",
            "/tmp/a.sock",
            "--disk",
            "path=/img/root.raw,id=root",
            "--disk",
            "/img/data.img,readonly=on",
            "--serial",
            "file=/tmp/s",
            "--log-level",
            "debug",
        ])
        .unwrap();
        let c = cli.vm_config();
        assert_eq!(c.memory.size, 5 * GIB);
        assert_eq!(c.memory.backing, crate::config::Backing::Memfd);
        assert_eq!(c.cpus, 2);
        assert_eq!(c.balloon.unwrap().size, GIB);
        assert_eq!(
            c.disks
                .iter()
                .map(|d| (d.id.as_str(), d.readonly))
                .collect::<Vec<_>>(),
            [("root", false), ("data.img", true)]
        );
        assert_eq!(
            c.serial,
            SerialConfig::File {
                path: "/tmp/s".into(),
                max: crate::config::DEFAULT_SERIAL_FILE_MAX
            }
        );
    }

    #[test]
    fn bad_values_are_rejected_with_the_reason() {
        let e = Cli::try_parse_from(["ebb", "--kernel", "k", "--memory", "lots"]).unwrap_err();
        assert!(e.to_string().contains("invalid size 'lots'"), "{e}");
        assert!(Cli::try_parse_from(["ebb", "--kernel", "k", "--cpus", "-1"]).is_err());
        assert!(Cli::try_parse_from(["ebb"]).is_err());
        assert!(Cli::try_parse_from(["ebb", "--kernel", "k", "--serial", "tty"]).is_err());
        let e = Cli::try_parse_from(["ebb", "--kernel", "k", "--disk", "readonly=on"]).unwrap_err();
        assert!(e.to_string().contains("gives no disk image"), "{e}");
        let e = Cli::try_parse_from(["ebb", "--kernel", "k", "--memory", "1G,backing=shm"])
            .unwrap_err();
        assert!(
            e.to_string().contains("unknown memory backing 'shm'"),
            "{e}"
        );
    }
}
