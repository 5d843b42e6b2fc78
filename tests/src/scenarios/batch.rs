//! Running a batch of scenarios from the outer machine: builds what they need first (the
//! default guest and the Ebb binary: inside the test host the cache and target directory
//! are read-only), then hands the batch to the test host's job runner
//! ([`crate::testhost::run`]: one L1 boot for the whole batch in nested mode, resumed or
//! rerun there when the emulation fails it) and returns its output with the scenarios'
//! result lines.

use std::path::Path;
use std::time::Duration;

use crate::guest as vm;
use crate::testhost::attempt_summary;
use crate::testhost::{self, Job, RunOutput};

/// A batch to run.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Items as the runner takes them: `name` or `name:key=value:key=value`.
    pub items: Vec<String>,
    /// Memory of the nested test host (guest sizes + ~300 MiB; guests run one at a time).
    pub l1_memory_mib: u32,
    /// Limit for one test-host attempt (boot of L1 included).
    pub timeout: Duration,
    /// Extra environment for the runner.
    pub env: Vec<(String, String)>,
    /// Forces the mode; `None`: detected ([`testhost::HostMode::detect`]).
    pub mode: Option<testhost::HostMode>,
    /// Parameters for the nested test host's kvm-amd module.
    pub kvm_amd_params: Vec<String>,
}

impl Batch {
    /// `items` in a test host of `l1_memory_mib`, each attempt limited to `timeout`; no
    /// extra environment, mode detected.
    pub fn new(items: &[&str], l1_memory_mib: u32, timeout: Duration) -> Batch {
        Batch {
            items: items.iter().map(|s| s.to_string()).collect(),
            l1_memory_mib,
            timeout,
            env: Vec::new(),
            mode: None,
            kvm_amd_params: Vec::new(),
        }
    }

    /// The names of the items' scenarios.
    pub fn names(&self) -> Vec<&str> {
        self.items
            .iter()
            .map(|i| i.split(':').next().unwrap_or(""))
            .collect()
    }
}

/// Builds the default guest (or, with `EBB_GUEST_PREBUILT=1`, only checks it is in the
/// cache) and the Ebb binary of this build profile. Call on the outer machine.
pub fn prepare() -> Result<(), String> {
    let artifacts = if std::env::var("EBB_GUEST_PREBUILT").is_ok_and(|v| v == "1") {
        vm::GuestArtifacts::locate()
    } else {
        vm::build_default_guest()
    }
    .map_err(|e| e.to_string())?;
    eprintln!("[batch] default guest: {}", artifacts.dir.display());
    let ebb = vm::build_ebb_binary().map_err(|e| e.to_string())?;
    eprintln!("[batch] ebb: {}", ebb.display());
    Ok(())
}

/// Runs `runner --json batch ITEMS...` on the test host (after [`prepare`]). `runner_prefix`
/// goes before `--json` (e.g. `--inside` for a binary that is its own runner).
pub fn run(runner: &Path, runner_prefix: &[&str], batch: &Batch) -> Result<RunOutput, String> {
    prepare()?;
    let mut argv = vec![runner.to_string_lossy().into_owned()];
    argv.extend(runner_prefix.iter().map(|s| s.to_string()));
    argv.push("--json".into());
    argv.push("batch".into());
    let job = Job {
        argv,
        items: batch.items.clone(),
        env: batch.env.clone(),
        l1_memory_mib: batch.l1_memory_mib,
        timeout: batch.timeout,
        mode: batch.mode,
        kvm_amd_params: batch.kvm_amd_params.clone(),
        ..Job::default()
    };
    let (probed, why) = testhost::HostMode::probe();
    eprintln!("[batch] host mode probe: {probed} ({why})");
    let run = testhost::run(&job).map_err(|e| e.to_string())?;
    eprintln!(
        "[batch] mode {} status {} attempts {} run dir {}\n[batch] timings {:?}",
        run.mode,
        run.status,
        run.attempts,
        run.out_dir.display(),
        run.timings
    );
    Ok(run)
}

/// [`run`] for an integration test: every item must report success and the runner
/// must exit 0; the error lists each failure, the run directory and the console tail.
pub fn run_all_ok(runner: &Path, batch: &Batch) -> Result<RunOutput, String> {
    let out = run(runner, &[], batch)?;
    eprintln!("results:\n{}", out.stdout);
    let failures = out.failures(&batch.names());
    if !failures.is_empty() {
        return Err(format!(
            "{} scenario(s) failed:\n{}\n\nrun dir {}\n{}\n--- in short ---\n{}",
            failures.len(),
            failures.join("\n\n"),
            out.out_dir.display(),
            out.report(),
            attempt_summary(&out.results)
        ));
    }
    out.ensure_success().map_err(|e| e.to_string())?;
    Ok(out)
}
