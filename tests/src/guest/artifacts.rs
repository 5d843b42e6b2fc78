//! The default guest: its artifacts in the cache, and building them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{GuestError, Result, TAIL_LINES};
use crate::paths;
use crate::text::{indent, tail};

/// The default guest built by resources/build-guest.sh in `$EBB_CACHE_DIR/guest/`.
#[derive(Debug, Clone)]
pub struct GuestArtifacts {
    pub dir: PathBuf,
    /// The stock Debian bzImage.
    pub vmlinuz: PathBuf,
    /// The ELF kernel (PVH entry), when present.
    pub vmlinux: Option<PathBuf>,
    pub initramfs: PathBuf,
    /// The kernel release, when recorded.
    pub kver: Option<String>,
}

impl GuestArtifacts {
    /// Finds the default guest; fails with instructions when it is not built.
    pub fn locate() -> Result<Self> {
        Self::in_dir(&paths::cache_dir().join("guest"))
    }

    pub fn in_dir(dir: &Path) -> Result<Self> {
        let how = "build it with `resources/build-guest.sh` on the outer machine (inside the \
                   nested test host the cache is a read-only view, so build before running \
                   scenarios there)";
        let vmlinuz = dir.join("vmlinuz");
        let initramfs = dir.join("initramfs.cpio.gz");
        for p in [&vmlinuz, &initramfs] {
            if !p.is_file() {
                return Err(GuestError::Missing(format!(
                    "the default guest is not built: {} is missing; {how}",
                    p.display()
                )));
            }
        }
        let vmlinux = Some(dir.join("vmlinux")).filter(|p| p.is_file());
        let kver = std::fs::read_to_string(dir.join("kver"))
            .ok()
            .map(|s| s.trim().to_string());
        Ok(GuestArtifacts {
            dir: dir.to_path_buf(),
            vmlinuz,
            vmlinux,
            initramfs,
            kver,
        })
    }
}

/// Builds the default guest with resources/build-guest.sh (a no-op when up to date) and
/// returns it. Call it on the outer machine before running scenarios: inside the nested
/// test host the cache is read-only, so there it only locates the artifacts.
pub fn build_default_guest() -> Result<GuestArtifacts> {
    if std::env::var(crate::testhost::ENV_SCENARIO_HOST).is_ok_and(|h| h == "nested") {
        return GuestArtifacts::locate();
    }
    let script = paths::resources_dir().join("build-guest.sh");
    if !script.is_file() {
        return Err(GuestError::Missing(format!(
            "{} is missing: the default guest cannot be built",
            script.display()
        )));
    }
    let out = Command::new("bash")
        .arg(&script)
        .env("EBB_CACHE_DIR", paths::cache_dir())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| GuestError::Spawn(format!("running {}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(GuestError::Missing(format!(
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            indent(&tail(&String::from_utf8_lossy(&out.stderr), TAIL_LINES))
        )));
    }
    GuestArtifacts::in_dir(Path::new(String::from_utf8_lossy(&out.stdout).trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_guest_says_how_to_build() {
        let e = GuestArtifacts::in_dir(Path::new("/nonexistent/guest")).unwrap_err();
        assert!(e.to_string().contains("build-guest.sh"), "{e}");
    }
}
