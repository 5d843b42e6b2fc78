//! The one result protocol of every job the test host runs (scenarios and benchmarks,
//! the demo, density runs): each result is ONE line on the job's stdout,
//!
//! ```text
//! EBB-JOB-RESULT {"job":"scenario","name":"boot-basic","ok":true,"run_dir":"/…/runs/…",…}
//! ```
//! a tag, then a JSON object with at least `job` (the kind), `name`, `ok` and `run_dir`
//! (the run directory the harness gave the job in `EBB_RUN_DIR`, where its stdout,
//! stderr and L1 console are kept; `null` outside the harness). Kinds add their own
//! fields (a scenario: `scenario`, `ms`, `host`, `data` or `error`, `notes`). Everything
//! else on stdout is progress for people. The runner reads results with [`parse`].

use std::io::Write;

use serde_json::{json, Value};

/// Starts every result line.
pub const TAG: &str = "EBB-JOB-RESULT ";
/// Set by the harness for the job: its run directory.
pub const ENV_RUN_DIR: &str = "EBB_RUN_DIR";

/// The result line for `fields` (a JSON object) of a job of kind `job` named `name`.
pub fn line(job: &str, name: &str, ok: bool, fields: Value) -> String {
    let mut v = json!({
        "job": job,
        "name": name,
        "ok": ok,
        "run_dir": std::env::var(ENV_RUN_DIR).ok(),
    });
    if let (Some(o), Value::Object(extra)) = (v.as_object_mut(), fields) {
        for (k, x) in extra {
            o.entry(k).or_insert(x);
        }
    }
    format!("{TAG}{v}")
}

/// Prints [`line`] on stdout (flushed: a job may die right after).
pub fn emit(job: &str, name: &str, ok: bool, fields: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line(job, name, ok, fields));
    let _ = out.flush();
}

/// Whether `line` is a result line.
pub fn is_result(line: &str) -> bool {
    line.starts_with(TAG)
}

/// The result objects in a job's stdout, in order (lines cut short are skipped).
pub fn parse(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(TAG))
        .filter_map(|j| serde_json::from_str::<Value>(j).ok())
        .filter(|v| v.get("name").is_some())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip() {
        let l = line("demo", "demo", true, json!({"data": {"x": 1}, "ok": false}));
        assert!(is_result(&l));
        let out = format!("progress\n{l}\n{TAG}{{\"cut\n{TAG}{{\"no\":\"name\"}}\n");
        let r = parse(&out);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0]["job"], "demo");
        assert_eq!(r[0]["ok"], true, "the fixed fields win");
        assert_eq!(r[0]["data"]["x"], 1);
        assert!(r[0].get("run_dir").is_some());
    }
}
