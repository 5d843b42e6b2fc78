//! Locations shared by the harness, the scenarios and the resource scripts.

use std::path::{Path, PathBuf};

/// The repository root (this crate's parent directory, fixed at build time).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `resources/` in the repository.
pub fn resources_dir() -> PathBuf {
    repo_root().join("resources")
}

/// The cargo target directory: `CARGO_TARGET_DIR` when set, else the nearest ancestor of
/// the running executable that holds cargo's `CACHEDIR.TAG`, else `<repo>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        return if dir.is_absolute() {
            dir
        } else {
            repo_root().join(dir)
        };
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            if dir.join("CACHEDIR.TAG").is_file() {
                return dir.to_path_buf();
            }
        }
    }
    repo_root().join("target")
}

/// The directory of the running executable's build profile (`target/<profile>`), where
/// cargo puts the workspace binaries (`ebb`, `ebb-scenario`).
pub fn profile_dir() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let mut dir = exe.parent()?.to_path_buf();
    if matches!(
        dir.file_name().and_then(|n| n.to_str()),
        Some("deps" | "examples")
    ) {
        dir = dir.parent()?.to_path_buf();
    }
    Some(dir)
}

/// Ebb's artifact cache, as resources/common.sh computes it:
/// `$EBB_CACHE_DIR`, else `$XDG_CACHE_HOME/ebb`, else `$HOME/.cache/ebb` (made absolute).
pub fn cache_dir() -> PathBuf {
    let nonempty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let dir = if let Some(dir) = nonempty("EBB_CACHE_DIR") {
        PathBuf::from(dir)
    } else if let Some(xdg) = nonempty("XDG_CACHE_HOME") {
        PathBuf::from(xdg).join("ebb")
    } else {
        let home = nonempty("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
        home.join(".cache").join("ebb")
    };
    if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir().unwrap_or_default().join(dir)
    }
}
