//! The VMMs a guest runs under: Ebb, and QEMU as the peer. Each says how to start a
//! guest (its command line), how to drive the balloon while the guest runs (Ebb's REST
//! API, QEMU's QMP, both over a control socket the command line opens) and how a clean
//! power-off looks.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::guest::{
    find_ebb_binary, find_qemu, GuestArtifacts, GuestConfig, GuestError, GuestExit, KernelImage,
    Result,
};
use crate::qmp::Qmp;

/// Which VMM (the name results and density runs carry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmKind {
    /// Ebb.
    Ebb,
    /// QEMU (`-M microvm,acpi=on`, virtio-balloon-device), the peer.
    Qemu,
}

impl VmmKind {
    /// Every VMM, Ebb first.
    pub const ALL: [VmmKind; 2] = [VmmKind::Ebb, VmmKind::Qemu];

    pub fn as_str(self) -> &'static str {
        match self {
            VmmKind::Ebb => "ebb",
            VmmKind::Qemu => "qemu",
        }
    }

    /// The VMM itself, found on this machine.
    pub fn vmm(self) -> Result<VmmRef> {
        Ok(match self {
            VmmKind::Ebb => Arc::new(Ebb {
                binary: find_ebb_binary()?,
            }),
            VmmKind::Qemu => Arc::new(Qemu {
                binary: find_qemu()?,
            }),
        })
    }
}

impl fmt::Display for VmmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VmmKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ebb" => Ok(VmmKind::Ebb),
            "qemu" => Ok(VmmKind::Qemu),
            other => Err(format!("vmm={other}: expected ebb or qemu")),
        }
    }
}

/// A VMM as the harness drives it.
pub trait Vmm: Send + Sync {
    fn kind(&self) -> VmmKind;

    fn name(&self) -> &'static str {
        self.kind().as_str()
    }

    /// The kernel image used when the configuration names none.
    fn default_kernel(&self, artifacts: &GuestArtifacts) -> KernelImage;

    /// Program and arguments for `config` (without `config.extra_args`).
    fn argv(&self, config: &GuestConfig, kernel: &Path, initramfs: &Path) -> Result<Vec<String>>;

    /// Arguments that open the balloon control socket at `socket`.
    fn control_args(&self, socket: &Path) -> Vec<String>;

    /// What the balloon control is called in results (`API`, `QMP`).
    fn control_name(&self) -> &'static str;

    /// Opens the balloon control at `socket` for a guest of `memory_mib`: one session for
    /// several requests (QEMU's QMP handshake happens here, not in each request).
    fn balloon_control(
        &self,
        socket: &Path,
        memory_mib: u64,
    ) -> std::result::Result<Box<dyn BalloonControl>, String>;

    /// Sets the balloon target to `balloon_mib` of the guest's `memory_mib`, over the
    /// control socket (a session of its own).
    fn set_balloon(
        &self,
        socket: &Path,
        memory_mib: u64,
        balloon_mib: u64,
    ) -> std::result::Result<(), String> {
        self.balloon_control(socket, memory_mib)?
            .set_balloon(balloon_mib)
    }

    /// The balloon's size (whole MiB) as the VMM reports it, over the control socket (a
    /// session of its own).
    fn balloon_mib(&self, socket: &Path, memory_mib: u64) -> std::result::Result<u64, String> {
        self.balloon_control(socket, memory_mib)?.balloon_mib()
    }

    /// Checks how the VMM ended after the guest powered off.
    fn check_poweroff(&self, exit: &GuestExit) -> std::result::Result<(), String> {
        if exit.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} exited with {} after poweroff; stderr:\n{}",
                self.name(),
                exit.status,
                exit.stderr
            ))
        }
    }
}

/// A shared VMM (guests keep theirs).
pub type VmmRef = Arc<dyn Vmm>;

/// An open balloon control of a running VMM: Ebb's REST API, QEMU's QMP session.
pub trait BalloonControl {
    /// Sets the balloon target to `balloon_mib`.
    fn set_balloon(&mut self, balloon_mib: u64) -> std::result::Result<(), String>;

    /// The balloon's size as the VMM reports it, in whole MiB (rounded down).
    fn balloon_mib(&mut self) -> std::result::Result<u64, String>;
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn onoff(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Ebb, from this binary.
#[derive(Debug, Clone)]
pub struct Ebb {
    pub binary: PathBuf,
}

impl Ebb {
    fn client(socket: &Path) -> ebb_ctl::client::Client {
        ebb_ctl::client::Client::new(socket, Duration::from_secs(30))
    }
}

impl Vmm for Ebb {
    fn kind(&self) -> VmmKind {
        VmmKind::Ebb
    }

    fn default_kernel(&self, _: &GuestArtifacts) -> KernelImage {
        KernelImage::BzImage
    }

    fn argv(&self, config: &GuestConfig, kernel: &Path, initramfs: &Path) -> Result<Vec<String>> {
        // The binary's presence is checked where it is found (`find_ebb_binary`).
        let mut argv: Vec<String> = Vec::new();

        argv.push(s(&self.binary));
        argv.extend(["--kernel".into(), s(kernel)]);
        argv.extend(["--initramfs".into(), s(initramfs)]);
        argv.extend(["--cmdline".into(), config.cmdline()]);
        let thp = match config.thp {
            Some(true) => ",thp=on",
            Some(false) => ",thp=off",
            None => "",
        };
        let backing = config
            .backing
            .as_ref()
            .map(|b| format!(",backing={b}"))
            .unwrap_or_default();
        let merge = if config.merge { ",merge=on" } else { "" };
        argv.extend([
            "--memory".into(),
            format!("{}M{thp}{backing}{merge}", config.memory_mib),
        ]);
        argv.extend(["--cpus".into(), config.cpus.to_string()]);
        argv.extend(["--serial".into(), "stdio".into()]);
        if let Some(b) = &config.balloon {
            argv.push("--balloon".into());
            argv.push(format!(
                "size={}M,deflate_on_oom={},free_page_reporting={},stats_interval={},\
                 free_page_hinting={}{}",
                b.size_mib,
                onoff(b.deflate_on_oom),
                onoff(b.free_page_reporting),
                b.stats_interval,
                onoff(b.free_page_hinting),
                if b.deflate_prefault {
                    ""
                } else {
                    ",deflate_prefault=off"
                }
            ));
        }
        for d in &config.disks {
            argv.push("--disk".into());
            argv.push(format!(
                "path={},readonly={},id={}",
                s(&d.path),
                onoff(d.readonly),
                d.id
            ));
        }

        Ok(argv)
    }

    fn control_args(&self, socket: &Path) -> Vec<String> {
        vec!["--api-socket".into(), s(socket)]
    }

    fn control_name(&self) -> &'static str {
        "API"
    }

    fn balloon_control(
        &self,
        socket: &Path,
        _: u64,
    ) -> std::result::Result<Box<dyn BalloonControl>, String> {
        Ok(Box::new(EbbApi(Self::client(socket))))
    }

    fn check_poweroff(&self, exit: &GuestExit) -> std::result::Result<(), String> {
        crate::scenarios::support::expect_exit(exit, 0, "ebb: guest powered off")
    }
}

/// Ebb's balloon over its REST API (each request on a fresh connection).
struct EbbApi(ebb_ctl::client::Client);

impl BalloonControl for EbbApi {
    fn set_balloon(&mut self, balloon_mib: u64) -> std::result::Result<(), String> {
        let body = json!({ "amount_mib": balloon_mib }).to_string();
        let resp = self
            .0
            .request("PATCH", "/balloon", Some(body.as_bytes()))
            .map_err(|e| format!("PATCH /balloon: {e}"))?;
        if resp.status == 204 {
            Ok(())
        } else {
            Err(format!("PATCH /balloon: {} {}", resp.status, resp.text()))
        }
    }

    fn balloon_mib(&mut self) -> std::result::Result<u64, String> {
        let b = self
            .0
            .get("/balloon")
            .map_err(|e| format!("GET /balloon: {e}"))?
            .json()
            .map_err(|e| format!("GET /balloon body: {e}"))?;
        b["actual_mib"]
            .as_u64()
            .ok_or_else(|| format!("GET /balloon without actual_mib: {b}"))
    }
}

/// QEMU (`qemu-system-x86_64 -M microvm,acpi=on -accel kvm`), the peer.
#[derive(Debug, Clone)]
pub struct Qemu {
    pub binary: PathBuf,
}

impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn default_kernel(&self, artifacts: &GuestArtifacts) -> KernelImage {
        if artifacts.vmlinux.is_some() {
            KernelImage::Elf
        } else {
            KernelImage::BzImage
        }
    }

    fn argv(&self, config: &GuestConfig, kernel: &Path, initramfs: &Path) -> Result<Vec<String>> {
        let mut argv: Vec<String> = Vec::new();

        argv.push(s(&self.binary));
        argv.extend(
            [
                "-M",
                if config.merge {
                    "microvm,acpi=on,mem-merge=on"
                } else {
                    "microvm,acpi=on,mem-merge=off"
                },
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
            ]
            .map(String::from),
        );
        argv.extend(["-m".into(), format!("{}M", config.memory_mib)]);
        argv.extend(["-smp".into(), config.cpus.to_string()]);
        argv.extend(["-kernel".into(), s(kernel)]);
        argv.extend(["-initrd".into(), s(initramfs)]);
        argv.extend(["-append".into(), config.cmdline()]);
        if let Some(b) = &config.balloon {
            if b.size_mib != 0 {
                return Err(GuestError::Unsupported(
                    "an initial balloon size for QEMU needs QMP (`balloon` command), which \
                     the harness does not drive yet"
                        .into(),
                ));
            }
            let mut dev = format!(
                "virtio-balloon-device,free-page-reporting={},deflate-on-oom={}",
                onoff(b.free_page_reporting),
                onoff(b.deflate_on_oom)
            );
            if b.stats_interval != 0 {
                dev.push_str(&format!(
                    ",guest-stats-polling-interval={}",
                    b.stats_interval
                ));
            }
            argv.extend(["-device".into(), dev]);
        }
        for (i, d) in config.disks.iter().enumerate() {
            // Host page cache as Ebb uses it (cache=writeback, QEMU's default), raw.
            argv.extend([
                "-drive".into(),
                format!(
                    "id=disk{i},file={},format=raw,if=none,readonly={}",
                    s(&d.path),
                    onoff(d.readonly)
                ),
                "-device".into(),
                format!("virtio-blk-device,drive=disk{i},serial={}", d.id),
            ]);
        }

        Ok(argv)
    }

    fn control_args(&self, socket: &Path) -> Vec<String> {
        vec![
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", socket.display()),
        ]
    }

    fn control_name(&self) -> &'static str {
        "QMP"
    }

    fn balloon_control(
        &self,
        socket: &Path,
        memory_mib: u64,
    ) -> std::result::Result<Box<dyn BalloonControl>, String> {
        Ok(Box::new(QemuQmp {
            qmp: Qmp::connect(socket, Duration::from_secs(60))?,
            memory_mib,
        }))
    }
}

/// QEMU's balloon over one QMP session.
struct QemuQmp {
    qmp: Qmp,
    memory_mib: u64,
}

impl BalloonControl for QemuQmp {
    fn set_balloon(&mut self, balloon_mib: u64) -> std::result::Result<(), String> {
        // QMP `balloon` takes the memory the guest keeps, not the balloon's size.
        self.qmp
            .set_guest_memory(self.memory_mib.saturating_sub(balloon_mib) << 20)
    }

    fn balloon_mib(&mut self) -> std::result::Result<u64, String> {
        // `query-balloon` gives the memory the guest keeps (bytes); the balloon is the
        // rest, rounded down: it holds `balloon_mib` once the guest keeps at most
        // `memory_mib - balloon_mib` MiB.
        let actual = self.qmp.balloon_actual()?;
        Ok((self.memory_mib << 20).saturating_sub(actual) >> 20)
    }
}
