//! Runs any command through the test host harness (`ebb_tests::testhost::run`): directly
//! on a KVM host, in the nested emulated test host elsewhere.
//!
//! ```text
//! ebb-testhost [--memory MIB] [--timeout SECS] [--mode direct|nested] [--env K=V]...
//!              [--kvm-amd NAME=VALUE]... -- CMD [ARG]...
//! ```
//! Prints the command's stdout and stderr, then a summary with timings on stderr; exits
//! with the command's status (or 125 when the harness failed).

use std::process::ExitCode;
use std::time::Duration;

use ebb_tests::testhost::{self, Job};

fn usage() -> ExitCode {
    eprintln!(
        "usage: ebb-testhost [--memory MIB] [--timeout SECS] [--mode direct|nested] \
         [--env K=V]... [--kvm-amd NAME=VALUE]... -- CMD [ARG]..."
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut scenario = Job::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next();
        match a.as_str() {
            "--" => break,
            "--memory" => match value().and_then(|v| v.parse().ok()) {
                Some(v) => scenario.l1_memory_mib = v,
                None => return usage(),
            },
            "--timeout" => match value().and_then(|v| v.parse().ok()) {
                Some(v) => scenario.timeout = Duration::from_secs(v),
                None => return usage(),
            },
            "--mode" => match value().and_then(|v| v.parse().ok()) {
                Some(v) => scenario.mode = Some(v),
                None => return usage(),
            },
            "--env" => match value().as_deref().and_then(|v| v.split_once('=')) {
                Some((k, v)) => scenario.env.push((k.into(), v.into())),
                None => return usage(),
            },
            "--kvm-amd" => match value() {
                Some(v) => scenario.kvm_amd_params.push(v),
                None => return usage(),
            },
            _ => return usage(),
        }
    }
    scenario.argv = args.collect();
    if scenario.argv.is_empty() {
        return usage();
    }
    match testhost::run(&scenario) {
        Ok(out) => {
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            eprintln!(
                "[ebb-testhost] mode {} status {} attempts {} run dir {}\n[ebb-testhost] {:?}",
                out.mode,
                out.status,
                out.attempts,
                out.out_dir.display(),
                out.timings
            );
            ExitCode::from(u8::try_from(out.status.clamp(0, 255)).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("[ebb-testhost] {e}");
            ExitCode::from(125)
        }
    }
}
