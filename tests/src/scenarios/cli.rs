//! Command-line errors that need a KVM able to run stock guests to be reached (on a PVM
//! host Ebb reports PVM first; vmm/tests/cli.rs checks everything else without a guest).
//! Each must give exit status 1, one `ebb: error:` line naming the problem, nothing on
//! stdout, and no hang.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::support::{artifacts, ebb_binary, ensure, run_with_limit, scratch_dir, OrStr};
use super::{Args, Ctx, ScenarioDef};

/// The scenarios of this family.
pub const SCENARIOS: &[ScenarioDef] = &[ScenarioDef {
    name: "cli-host-limits",
    help: "with a usable KVM: --cpus above KVM's limit, --memory above what the host can \
           address, an unwritable --serial file, /dev/kvm for an unprivileged user and a \
           non-kernel ELF each fail with one `ebb: error:` line and status 1",
    run: cli_host_limits,
}];

const LIMIT: Duration = Duration::from_secs(60);

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(argv: &[String]) -> Result<Outcome, String> {
    let f = run_with_limit(argv, LIMIT)?;
    Ok(Outcome {
        code: f.status.code(),
        stdout: f.stdout,
        stderr: f.stderr,
    })
}

/// Runs ebb expecting the one-line error; returns the message.
fn expect_error(argv: &[String], needles: &[&str]) -> Result<String, String> {
    let o = run(argv)?;
    let d = || {
        format!(
            "{}\nstatus {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            argv.join(" "),
            o.code,
            o.stdout,
            o.stderr
        )
    };
    ensure(o.code == Some(1), || {
        format!("exit status must be 1\n{}", d())
    })?;
    ensure(o.stdout.is_empty(), || {
        format!("nothing may go to stdout\n{}", d())
    })?;
    let lines: Vec<&str> = o.stderr.lines().collect();
    ensure(lines.len() == 1, || {
        format!("stderr must be one line\n{}", d())
    })?;
    let msg = lines[0]
        .strip_prefix("ebb: error: ")
        .ok_or_else(|| format!("the line must start with `ebb: error: `\n{}", d()))?;
    for n in needles {
        ensure(msg.contains(n), || {
            format!("message must mention {n:?}\n{}", d())
        })?;
    }
    Ok(msg.to_string())
}

fn argv(ebb: &Path, kernel: &Path, initramfs: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        ebb.to_string_lossy().into_owned(),
        "--kernel".into(),
        kernel.to_string_lossy().into_owned(),
        "--initramfs".into(),
        initramfs.to_string_lossy().into_owned(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn cli_host_limits(_ctx: &Ctx, args: &Args) -> Result<Value, String> {
    args.check_known(&[])?;
    let ebb = ebb_binary()?;
    let a = artifacts()?;
    let kernel = a.vmlinux.clone().unwrap_or_else(|| a.vmlinuz.clone());
    let initrd = a.initramfs.clone();
    let mut data = serde_json::Map::new();

    let m = expect_error(
        &argv(&ebb, &kernel, &initrd, &["--cpus", "4096"]),
        &["--cpus 4096 is more than this host allows", "at most"],
    )?;
    data.insert("cpus_4096".into(), json!(m));
    let m = expect_error(
        &argv(&ebb, &kernel, &initrd, &["--cpus", "256"]),
        &["--cpus 256 is more than this host allows"],
    )?;
    data.insert("cpus_256".into(), json!(m));

    let m = expect_error(
        &argv(&ebb, &kernel, &initrd, &["--memory", "100T"]),
        &["100 TiB"],
    )?;
    ensure(
        m.contains("more than this host can address") || m.contains("cannot reserve"),
        || format!("--memory 100T: unexpected reason: {m}"),
    )?;
    data.insert("memory_100t".into(), json!(m));

    let m = expect_error(
        &argv(
            &ebb,
            &kernel,
            &initrd,
            &["--serial", "file=/nonexistent-ebb-dir/console.log"],
        ),
        &["cannot open serial output file '/nonexistent-ebb-dir/console.log'"],
    )?;
    data.insert("serial_unwritable".into(), json!(m));

    // Not a kernel although an x86_64 ELF: rejected while loading, before any vCPU runs.
    let not_kernel = ["/bin/true", "/usr/bin/true"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or("no /bin/true to use as a non-kernel ELF")?;
    let m = expect_error(
        &argv(&ebb, not_kernel, &initrd, &[]),
        &["loading the kernel into guest memory failed"],
    )?;
    data.insert("elf_not_a_kernel".into(), json!(m));

    // The real /dev/kvm for an unprivileged user.
    let mode = std::fs::metadata("/dev/kvm")
        .ctx("/dev/kvm")?
        .permissions()
        .mode();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if mode & 0o006 != 0o006 && root {
        let dir = scratch_dir("kvmperm")?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).s()?;
        let copy = |src: &Path, name: &str| -> Result<std::path::PathBuf, String> {
            let dst = dir.join(name);
            std::fs::copy(src, &dst).ctx(&format!("copying {}", src.display()))?;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).s()?;
            Ok(dst)
        };
        let e = copy(&ebb, "ebb")?;
        let k = copy(&kernel, "kernel")?;
        let i = copy(&initrd, "initramfs")?;
        let mut v = vec![
            "setpriv".to_string(),
            "--reuid=65534".into(),
            "--regid=65534".into(),
            "--clear-groups".into(),
            "--".into(),
        ];
        v.extend(argv(&e, &k, &i, &[]));
        let m = expect_error(&v, &["permission denied opening /dev/kvm"]);
        let _ = std::fs::remove_dir_all(&dir);
        data.insert("kvm_unprivileged".into(), json!(m?));
    } else {
        data.insert(
            "kvm_unprivileged".into(),
            json!(format!(
                "not applicable: /dev/kvm mode {:o}, root={root} (vmm/tests/cli.rs covers \
                 the message with a stand-in device)",
                mode & 0o777
            )),
        );
    }
    Ok(Value::Object(data))
}
