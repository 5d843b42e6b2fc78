//! Running a batch of scenarios from the outer machine: builds what they need first (the
//! default guest and the Ebb binary: inside the test host the cache and target directory
//! are read-only), runs the runner through [`crate::testhost::run`] (one L1 boot for the
//! whole batch in nested mode) and parses the result lines.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::guest;
use crate::testhost::{self, RunOutput, Scenario};

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
        }
    }
}

/// What a batch produced.
pub struct BatchOutput {
    pub run: RunOutput,
    /// One JSON object per scenario that reported (see [`crate::scenarios`]).
    pub results: Vec<Value>,
}

impl BatchOutput {
    /// The result line of scenario `name` (the first one when it ran several times).
    pub fn result(&self, name: &str) -> Option<&Value> {
        self.results.iter().find(|r| r["scenario"] == name)
    }

    /// A readable list of the scenarios that failed or did not report, with their
    /// errors; empty when all of `expected` passed.
    pub fn failures(&self, expected: &[&str]) -> Vec<String> {
        let mut out = Vec::new();
        for name in expected {
            match self.result(name) {
                None => out.push(format!("{name}: no result line (the runner died?)")),
                Some(r) if r["ok"] != true => {
                    let mut text = format!("{name}: FAILED: {}", error_text(r));
                    if let Some(e) = r["rerun_error"].as_str() {
                        text.push_str(&format!("\n(a rerun in a fresh test host failed: {e})"));
                    }
                    out.push(text)
                }
                Some(_) => {}
            }
        }
        out
    }
}

/// Parses the runner's `--json` result lines out of its stdout.
pub fn parse_results(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("scenario").is_some())
        .collect()
}

fn error_text(result: &Value) -> &str {
    result["error"].as_str().unwrap_or("(no error text)")
}

/// One line per attempt of each scenario that failed in the end: the short story of a
/// failed batch, which the long report before it can push out of sight.
pub fn attempt_summary(results: &[Value]) -> String {
    let mut s = String::new();
    let first_line = |t: &str| t.lines().next().unwrap_or_default().to_string();
    for r in results.iter().filter(|r| r["ok"] != true) {
        let name = r["scenario"].as_str().unwrap_or("?");
        let earlier = r["earlier_attempts"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        for (i, a) in earlier.iter().chain([r]).enumerate() {
            s.push_str(&format!(
                "{name} attempt {}: {}\n",
                i + 1,
                first_line(error_text(a))
            ));
        }
        if let Some(e) = r["rerun_error"].as_str() {
            s.push_str(&format!("{name} rerun: {}\n", first_line(e)));
        }
    }
    s
}

/// Builds the default guest (or, with `EBB_GUEST_PREBUILT=1`, only checks it is in the
/// cache) and the Ebb binary of this build profile. Call on the outer machine.
pub fn prepare() -> Result<(), String> {
    let artifacts = if std::env::var("EBB_GUEST_PREBUILT").is_ok_and(|v| v == "1") {
        guest::GuestArtifacts::locate()
    } else {
        guest::build_default_guest()
    }
    .map_err(|e| e.to_string())?;
    eprintln!("[batch] default guest: {}", artifacts.dir.display());
    let ebb = guest::build_ebb_binary().map_err(|e| e.to_string())?;
    eprintln!("[batch] ebb: {}", ebb.display());
    Ok(())
}

/// Runs `runner --json batch ITEMS...` on the test host (after [`prepare`]). `runner_prefix`
/// goes before `--json` (e.g. `--inside` for a binary that is its own runner).
pub fn run(runner: &Path, runner_prefix: &[&str], batch: &Batch) -> Result<BatchOutput, String> {
    prepare()?;
    let mut argv = vec![runner.to_string_lossy().into_owned()];
    argv.extend(runner_prefix.iter().map(|s| s.to_string()));
    argv.push("--json".into());
    argv.push("batch".into());
    argv.extend(batch.items.iter().cloned());
    let scenario = Scenario {
        argv,
        env: batch.env.clone(),
        l1_memory_mib: batch.l1_memory_mib,
        timeout: batch.timeout,
        mode: batch.mode,
        resume: Some(resume_batch),
        ..Scenario::default()
    };
    let (probed, why) = testhost::HostMode::probe();
    eprintln!("[batch] host mode probe: {probed} ({why})");
    let run = testhost::run(&scenario).map_err(|e| e.to_string())?;
    eprintln!(
        "[batch] mode {} status {} attempts {} run dir {}\n[batch] timings {:?}",
        run.mode,
        run.status,
        run.attempts,
        run.out_dir.display(),
        run.timings
    );
    let mut results = parse_results(&run.stdout);
    let mut run = run;
    let mut console = run.console_log.clone();
    let mut reran = false;
    for rerun in 1..=EMULATION_RERUNS {
        let mut crashed = emulation_crashes(&results, &batch.items);
        if crashed.is_empty() && testhost::console_shows_stall(&console) {
            // L1 locked up for a while and came back; a scenario that failed meanwhile (its
            // guest stopped answering) gets the same second chance as a crashed guest.
            crashed = failed_items(&results, &batch.items);
        }
        if run.mode != testhost::HostMode::Nested || crashed.is_empty() {
            break;
        }
        // The emulated host now and then crashes an L2 guest outright (a triple fault
        // with no panic message, with or without Ebb's devices at work, QEMU's guests as
        // well: QEMU's TCG emulation of SVM). Those scenarios run again in a fresh test
        // host; the failures stay on record in the result (`earlier_attempts`).
        eprintln!(
            "[batch] the emulated host crashed a guest or stalled: rerun {rerun} of {} in a \
             fresh test host",
            crashed.join(" ")
        );
        // A rerun scenario may recall what the batch's earlier scenarios noted.
        let notes = results.iter().rev().find_map(|r| r.get("notes"));
        let again = follow_up(&scenario, &crashed, notes);
        run.stdout.push_str(&format!("\n--- rerun {rerun} ---\n"));
        reran = true;
        match testhost::run(&again) {
            Ok(next) => {
                eprintln!(
                    "[batch] rerun {rerun}: status {} run dir {}",
                    next.status,
                    next.out_dir.display()
                );
                merge_rerun(&mut results, parse_results(&next.stdout));
                run.stdout.push_str(&next.stdout);
                console = next.console_log;
            }
            Err(e) => {
                // The earlier failures stand; say why the rerun did not replace them.
                run.stdout.push_str(&format!("rerun failed: {e}\n"));
                for r in results
                    .iter_mut()
                    .filter(|r| crashed.iter().any(|item| r["scenario"] == item_name(item)))
                {
                    r["rerun_error"] = Value::String(e.to_string());
                }
                break;
            }
        }
    }
    // The batch succeeds only if every scenario passed in the end: the runner's own exit
    // status counts failures that a rerun has since replaced.
    if reran
        && run.status != 0
        && results.len() >= batch.items.len()
        && results.iter().all(|r| r["ok"] == true)
    {
        run.status = 0;
    }
    Ok(BatchOutput { run, results })
}

/// How many times a batch reruns the scenarios the emulated host crashed, each time in a
/// fresh test host. In CI's ~60 guest runs one or two crash; twice in a row is rare, three
/// times has not been seen.
const EMULATION_RERUNS: u32 = 2;

/// Replaces the results of rerun scenarios by their new ones, keeping the failed ones in
/// `earlier_attempts`.
fn merge_rerun(results: &mut [Value], rerun: Vec<Value>) {
    for mut r in rerun {
        if let Some(old) = results.iter_mut().find(|o| o["scenario"] == r["scenario"]) {
            let mut earlier = match old.get_mut("earlier_attempts").map(Value::take) {
                Some(Value::Array(a)) => a,
                _ => Vec::new(),
            };
            let mut first = old.take();
            if let Some(o) = first.as_object_mut() {
                o.remove("earlier_attempts");
            }
            earlier.push(first);
            r["earlier_attempts"] = Value::Array(earlier);
            *old = r;
        }
    }
}

/// [`run`] for an integration test: every item must report success and the runner
/// must exit 0; the error lists each failure, the run directory and the console tail.
pub fn run_all_ok(runner: &Path, batch: &Batch) -> Result<BatchOutput, String> {
    let out = run(runner, &[], batch)?;
    eprintln!("results:\n{}", out.run.stdout);
    let names: Vec<&str> = batch.items.iter().map(|i| item_name(i)).collect();
    let failures = out.failures(&names);
    if !failures.is_empty() {
        return Err(format!(
            "{} scenario(s) failed:\n{}\n\nrun dir {}\n{}\n--- in short ---\n{}",
            failures.len(),
            failures.join("\n\n"),
            out.run.out_dir.display(),
            out.run.report(),
            attempt_summary(&out.results)
        ));
    }
    out.run.ensure_success().map_err(|e| e.to_string())?;
    Ok(out)
}

/// [`Scenario::resume`] for a batch: after a test host that died, the next attempt runs
/// the items that did not report, starting from the facts the reported ones noted. The
/// same batch again when nothing reported (or the lines do not match the items).
fn resume_batch(attempt: &Scenario, stdout: &str) -> Scenario {
    let Some(at) = attempt.argv.iter().position(|a| a == "batch") else {
        return attempt.clone();
    };
    let items = &attempt.argv[at + 1..];
    let reported = parse_results(stdout);
    // The runner reports items in order, one line each.
    let in_order = reported
        .iter()
        .zip(items)
        .all(|(r, item)| r["scenario"] == item_name(item));
    if reported.is_empty() || reported.len() >= items.len() || !in_order {
        return attempt.clone();
    }
    let notes = reported.last().and_then(|r| r.get("notes"));
    follow_up(attempt, &items[reported.len()..], notes)
}

/// The batch run `attempt` again with only `items`, starting from `notes` (replacing any
/// it had) when given: the shape of both a resumed batch and a rerun.
fn follow_up(attempt: &Scenario, items: &[String], notes: Option<&Value>) -> Scenario {
    let mut next = attempt.clone();
    // Both callers run batches, so "batch" is there; the items follow it.
    let at = next
        .argv
        .iter()
        .position(|a| a == "batch")
        .map_or(next.argv.len(), |i| i + 1);
    next.argv.truncate(at);
    next.argv.extend(items.iter().cloned());
    if let Some(notes) = notes {
        next.env.retain(|(k, _)| k != super::ENV_NOTES);
        next.env.push((super::ENV_NOTES.into(), notes.to_string()));
    }
    next
}

fn item_name(item: &str) -> &str {
    item.split(':').next().unwrap_or("")
}

/// The items whose scenario reported a failure for which `why` holds.
fn failed_items_where(
    results: &[Value],
    items: &[String],
    why: impl Fn(&Value) -> bool,
) -> Vec<String> {
    items
        .iter()
        .filter(|item| {
            results
                .iter()
                .any(|r| r["scenario"] == item_name(item) && r["ok"] != true && why(r))
        })
        .cloned()
        .collect()
}

/// The items whose scenario reported a failure.
fn failed_items(results: &[Value], items: &[String]) -> Vec<String> {
    failed_items_where(results, items, |_| true)
}

/// The items whose scenario failed because its guest triple-faulted.
fn emulation_crashes(results: &[Value], items: &[String]) -> Vec<String> {
    failed_items_where(results, items, |r| {
        error_text(r).contains(crate::guest::TRIPLE_FAULT_EXIT)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines() {
        let out = "noise\n{\"scenario\":\"a\",\"ok\":true}\n{\"other\":1}\n{broken\n\
                   {\"scenario\":\"b\",\"ok\":false,\"error\":\"boom\"}\n";
        let results = parse_results(out);
        assert_eq!(results.len(), 2);
        let fake = results.clone();
        let failures: Vec<String> = ["a", "b", "c"]
            .iter()
            .filter_map(|n| match fake.iter().find(|r| r["scenario"] == *n) {
                None => Some(format!("{n}: none")),
                Some(r) if r["ok"] != true => Some(format!("{n}: {}", r["error"])),
                _ => None,
            })
            .collect();
        assert_eq!(failures.len(), 2);
    }

    fn batch_of(items: &[&str]) -> Scenario {
        let mut argv = vec!["/r".to_string(), "--json".into(), "batch".into()];
        argv.extend(items.iter().map(|s| s.to_string()));
        Scenario {
            argv,
            env: vec![("K".into(), "v".into())],
            ..Scenario::default()
        }
    }

    #[test]
    fn a_resumed_batch_runs_what_did_not_report_with_the_notes_so_far() {
        let first = batch_of(&["a", "b:x=1", "c"]);
        // L1 died in the middle of b (its result line cut short).
        let stdout = "{\"scenario\":\"a\",\"ok\":true,\"notes\":{\"m\":5}}\n{\"scen";
        let next = resume_batch(&first, stdout);
        assert_eq!(next.argv, batch_of(&["b:x=1", "c"]).argv);
        assert!(next.env.contains(&("K".into(), "v".into())));
        assert!(next
            .env
            .contains(&(crate::scenarios::ENV_NOTES.into(), "{\"m\":5}".into())));
        // Resumed again after c died too: the newest notes replace the old ones.
        let again = resume_batch(
            &next,
            "{\"scenario\":\"b\",\"ok\":false,\"notes\":{\"m\":6}}\n",
        );
        assert_eq!(again.argv, batch_of(&["c"]).argv);
        let notes: Vec<_> = again
            .env
            .iter()
            .filter(|(k, _)| k == crate::scenarios::ENV_NOTES)
            .collect();
        assert_eq!(
            notes,
            [&(crate::scenarios::ENV_NOTES.into(), "{\"m\":6}".into())]
        );
    }

    #[test]
    fn a_batch_without_usable_progress_is_run_again_whole() {
        let first = batch_of(&["a", "b"]);
        let same = |stdout: &str| resume_batch(&first, stdout).argv == first.argv;
        assert!(same(""), "nothing reported");
        assert!(
            same("{\"scenario\":\"b\",\"ok\":true}\n"),
            "not in item order"
        );
        assert!(
            same("{\"scenario\":\"a\",\"ok\":true}\n{\"scenario\":\"b\",\"ok\":true}\n"),
            "everything reported: only the exit status is missing"
        );
    }

    #[test]
    fn only_triple_faults_are_retried() {
        let results = parse_results(
            "{\"scenario\":\"a\",\"ok\":false,\"error\":\"ebb: guest stopped: vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)\"}\n\
             {\"scenario\":\"b\",\"ok\":false,\"error\":\"RSS stayed high\"}\n\
             {\"scenario\":\"c\",\"ok\":true}\n",
        );
        let items = ["a:x=1", "b", "c"].map(String::from);
        assert_eq!(
            emulation_crashes(&results, &items),
            vec!["a:x=1".to_string()]
        );
    }

    #[test]
    fn reruns_replace_results_and_keep_each_failure() {
        let crash = "{\"scenario\":\"a\",\"ok\":false,\"error\":\"triple fault\"}\n";
        let mut results = parse_results(&format!("{crash}{{\"scenario\":\"b\",\"ok\":true}}\n"));
        merge_rerun(&mut results, parse_results(crash));
        merge_rerun(
            &mut results,
            parse_results("{\"scenario\":\"a\",\"ok\":false,\"error\":\"hang\\nmore\"}\n"),
        );
        assert_eq!(results.len(), 2);
        assert_eq!(results[0]["earlier_attempts"].as_array().unwrap().len(), 2);
        assert!(results[0]["earlier_attempts"][1]
            .get("earlier_attempts")
            .is_none());
        assert_eq!(results[1]["ok"], true);
        assert_eq!(
            attempt_summary(&results),
            "a attempt 1: triple fault\na attempt 2: triple fault\na attempt 3: hang\n"
        );
        merge_rerun(
            &mut results,
            parse_results("{\"scenario\":\"a\",\"ok\":true}\n"),
        );
        assert_eq!(results[0]["ok"], true);
        assert_eq!(attempt_summary(&results), "");
    }
}
