//! Host capability checks: is there a KVM Ebb can use?

use std::path::{Path, PathBuf};

use kvm_ioctls::{Cap, Kvm};

/// Why this host cannot run guests.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No KVM device node.
    #[error(
        "{0} not found: this host has no KVM. Load kvm_intel or kvm_amd (on a cloud \
         instance, enable nested virtualization)"
    )]
    KvmMissing(PathBuf),
    /// The device exists but cannot be opened.
    #[error("permission denied opening {0}: add your user to the 'kvm' group or run Ebb as root")]
    KvmPermission(PathBuf),
    /// Other open failures.
    #[error("cannot open {path}: {source}")]
    KvmOpen {
        /// Device path.
        path: PathBuf,
        /// Error.
        source: kvm_ioctls::Error,
    },
    /// The KVM is PVM, which runs only PVM-enabled guest kernels.
    #[error(
        "this host's KVM is PVM (module kvm_pvm), which cannot boot standard Linux guests: \
         they hang in early boot. Run Ebb on a host with hardware KVM (kvm_intel or \
         kvm_amd), or use the nested test host in tests/ (see README, 'The test host')"
    )]
    PvmHost,
    /// KVM lacks a capability Ebb needs.
    #[error("this host's KVM lacks {0}, which Ebb needs")]
    MissingCapability(&'static str),
    /// Unexpected API version.
    #[error("unsupported KVM API version {0} (expected 12)")]
    ApiVersion(i32),
}

/// Where Ebb looks at the host. Only tests point these elsewhere (hidden command-line
/// flags, so a release binary never takes them from the environment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// The kernel's module directory, where a loaded `kvm_pvm` shows.
    pub module_dir: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            kvm_device: PathBuf::from(DEFAULT_KVM_DEVICE),
            module_dir: PathBuf::from(DEFAULT_MODULE_DIR),
        }
    }
}

/// The KVM device node of every Linux host.
pub const DEFAULT_KVM_DEVICE: &str = "/dev/kvm";
/// Where Linux lists loaded modules.
pub const DEFAULT_MODULE_DIR: &str = "/sys/module";

/// True when the loaded KVM module is PVM.
pub fn is_pvm_host(paths: &HostPaths) -> bool {
    paths.module_dir.join("kvm_pvm").exists()
}

/// Opens KVM and checks that it can run stock Linux guests with what Ebb uses.
pub fn open_kvm(paths: &HostPaths) -> Result<Kvm, HostError> {
    let kvm = open_kvm_at(&paths.kvm_device)?;
    if is_pvm_host(paths) {
        return Err(HostError::PvmHost);
    }
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(HostError::ApiVersion(version));
    }
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::Ioeventfd, "ioeventfd (KVM_CAP_IOEVENTFD)"),
        (Cap::UserMemory, "user memory slots (KVM_CAP_USER_MEMORY)"),
        (Cap::Pit2, "the in-kernel PIT (KVM_CAP_PIT2)"),
        (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID (KVM_CAP_EXT_CPUID)"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(HostError::MissingCapability(name));
        }
    }
    Ok(kvm)
}

fn open_kvm_at(path: &Path) -> Result<Kvm, HostError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| HostError::KvmMissing(path.to_path_buf()))?;
    match Kvm::new_with_path(c_path) {
        Ok(kvm) => Ok(kvm),
        Err(e) if e.errno() == libc::ENOENT => Err(HostError::KvmMissing(path.to_path_buf())),
        Err(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
            Err(HostError::KvmPermission(path.to_path_buf()))
        }
        Err(source) => Err(HostError::KvmOpen {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Most vCPUs KVM allows in one VM.
pub fn max_vcpus(kvm: &Kvm) -> u32 {
    kvm.get_max_vcpus() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_is_reported_as_missing() {
        let e = open_kvm_at(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(e, HostError::KvmMissing(_)), "{e}");
        assert!(e.to_string().contains("/nonexistent/kvm not found"));
    }
}
