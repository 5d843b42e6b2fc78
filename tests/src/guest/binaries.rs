//! The VMM binaries: Ebb (found next to the running executable, or built with cargo) and
//! QEMU (found on PATH).

use std::path::PathBuf;
use std::process::{Command, Stdio};

use super::{GuestError, Result, TAIL_LINES};
use crate::paths;
use crate::text::{indent, tail};

/// Finds the Ebb binary: `EBB_BINARY` when set, else `ebb` next to the running executable
/// (`target/<profile>/ebb`).
pub fn find_ebb_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("EBB_BINARY") {
        Some(p) => PathBuf::from(p),
        None => paths::profile_dir()
            .ok_or_else(|| GuestError::Missing("cannot locate the running executable".into()))?
            .join("ebb"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(GuestError::Missing(format!(
            "the ebb binary {} is missing: build it with `cargo build -p ebb-vmm --bin ebb` \
             (the same profile as this program), or point EBB_BINARY at it",
            path.display()
        )))
    }
}

/// Builds the Ebb binary with cargo (`cargo build -p ebb-vmm --bin ebb`, `--release` when
/// the running executable is a release build) and returns its path. For tests on the
/// outer machine; inside the nested test host use [`find_ebb_binary`].
pub fn build_ebb_binary() -> Result<PathBuf> {
    let release = paths::profile_dir()
        .and_then(|d| d.file_name().map(|n| n == "release"))
        .unwrap_or(false);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // ebb-ctl too: the API benchmark drives a running Ebb with it.
    cmd.args([
        "build", "--quiet", "-p", "ebb-vmm", "-p", "ebb-ctl", "--bin", "ebb", "--bin", "ebb-ctl",
    ])
    .current_dir(paths::repo_root())
    .env("CARGO_TARGET_DIR", paths::target_dir())
    .stdin(Stdio::null());
    if release {
        cmd.arg("--release");
    }
    let out = cmd
        .output()
        .map_err(|e| GuestError::Spawn(format!("running cargo build for ebb: {e}")))?;
    if !out.status.success() {
        return Err(GuestError::Missing(format!(
            "cargo build -p ebb-vmm --bin ebb failed ({}):\n{}",
            out.status,
            indent(&tail(&String::from_utf8_lossy(&out.stderr), TAIL_LINES))
        )));
    }
    let path = paths::target_dir()
        .join(if release { "release" } else { "debug" })
        .join("ebb");
    if path.is_file() {
        Ok(path)
    } else {
        Err(GuestError::Missing(format!(
            "cargo built ebb but {} does not exist",
            path.display()
        )))
    }
}

/// Finds qemu-system-x86_64 on PATH.
pub fn find_qemu() -> Result<PathBuf> {
    crate::testhost::find_qemu().map_err(GuestError::Missing)
}
