//! The one job runner and its one retry policy.
//!
//! A job runs in attempts (a boot of L1, or a child process here). After each one the
//! policy ([`Retry::after`]) decides:
//! - the attempt died without an exit status (L1 crashed, stalled, never reached the job):
//!   run again, a batch from its first item without a result line and with the facts its
//!   reported items noted (`EBB_SCENARIO_NOTES`); up to [`MAX_DEATHS`] attempts while each
//!   gets further, two when one does not;
//! - the job finished, in the nested test host, and batch items failed because the
//!   emulation crashed their guest (a triple fault), or failed while L1's console showed a
//!   stall: those items run again in a fresh L1 with the batch's notes, up to
//!   [`EMULATION_RERUNS`] times; their failures stay on record (`earlier_attempts`);
//! - otherwise the job is done.

use std::time::Instant;

use serde_json::Value;

use super::attempt::{self, Outcome};
use super::console::console_shows_stall;
use super::l1::L1;
use super::rundir::new_run_dir;
use super::{error_text, Error, HostMode, Job, RunOutput, TRIPLE_FAULT_EXIT};
use crate::{paths, results};

/// Attempts that may die in a row. Beyond the second, only while each gets further.
const MAX_DEATHS: usize = 4;
/// How many times a batch reruns the items the emulated host crashed, each time in a
/// fresh test host. In CI's ~60 guest runs one or two crash; twice in a row is rare, three
/// times has not been seen.
const EMULATION_RERUNS: u32 = 2;

/// Runs `job` in the mode detected for this machine (or the one it forces), retrying as
/// the module documentation says.
pub fn run(job: &Job) -> Result<RunOutput, Error> {
    let t0 = Instant::now();
    let mode = match job.mode {
        Some(m) => m,
        None => HostMode::detect()?,
    };
    if job.argv.is_empty() {
        return Err(Error::Setup("empty argv".into()));
    }
    let l1 = match mode {
        HostMode::Direct => None,
        HostMode::Nested => {
            let (target, cache, cwd) = (paths::target_dir(), paths::cache_dir(), job.working_dir());
            Some(L1::prepare(&[
                ("the cargo target directory", &target),
                ("the Ebb cache directory (EBB_CACHE_DIR)", &cache),
                ("the working directory", &cwd),
            ])?)
        }
    };
    let mut retry = Retry::new(job);
    let out = loop {
        let dir = new_run_dir(&format!("{mode}-a{}", retry.attempts + 1))?;
        let outcome = match &l1 {
            None => attempt::direct(&retry.next, &dir)?,
            Some(l1) => attempt::nested(l1, &retry.next, &dir)?,
        };
        match retry.after(outcome)? {
            Some(out) => break out,
            None => continue,
        }
    };
    let mut out = out;
    if let Some(l1) = &l1 {
        out.timings.lock_wait = l1.lock_wait;
        out.timings.prepare = l1.prepare;
    }
    out.timings.total = t0.elapsed();
    Ok(out)
}

/// The retry policy's state.
struct Retry {
    /// The job as asked for.
    job: Job,
    /// What the next attempt runs.
    next: Job,
    attempts: u32,
    /// Every attempt's stdout.
    stdout: String,
    /// The result lines so far, a rerun's replacing the earlier one.
    results: Vec<Value>,
    /// The facts the newest result line carried (`notes`).
    notes: Option<Value>,
    /// Why each attempt of the current phase died.
    deaths: Vec<String>,
    /// Deaths in a row that did not get further.
    fruitless: u32,
    reruns: u32,
    /// While rerunning: the run that finished before, which stands if the rerun dies.
    before_rerun: Option<RunOutput>,
}

impl Retry {
    fn new(job: &Job) -> Retry {
        Retry {
            job: job.clone(),
            next: job.clone(),
            attempts: 0,
            stdout: String::new(),
            results: Vec::new(),
            notes: None,
            deaths: Vec::new(),
            fruitless: 0,
            reruns: 0,
            before_rerun: None,
        }
    }

    /// Takes in an attempt's outcome: `Some` when the job is done, `None` to run
    /// [`Retry::next`].
    fn after(&mut self, outcome: Outcome) -> Result<Option<RunOutput>, Error> {
        self.attempts += 1;
        match outcome {
            Outcome::Died { why, stdout } => self.died(why, &stdout),
            Outcome::Finished(run) => Ok(self.finished(run)),
        }
    }

    fn take_stdout(&mut self, stdout: &str) -> Vec<Value> {
        self.stdout.push_str(stdout);
        if !self.stdout.is_empty() && !self.stdout.ends_with('\n') {
            self.stdout.push('\n');
        }
        let reported = results::parse(stdout);
        if let Some(n) = reported.iter().rev().find_map(|r| r.get("notes")) {
            self.notes = Some(n.clone());
        }
        merge(&mut self.results, reported.clone());
        reported
    }

    fn died(&mut self, why: String, stdout: &str) -> Result<Option<RunOutput>, Error> {
        let reported = self.take_stdout(stdout);
        let next = resume(&self.next, &reported, self.notes.as_ref());
        self.fruitless = if next.items != self.next.items {
            0
        } else {
            self.fruitless + 1
        };
        self.deaths.push(why);
        if self.fruitless >= 2 || self.deaths.len() >= MAX_DEATHS {
            let e = attempts_failed(&self.deaths);
            let Some(mut before) = self.before_rerun.take() else {
                return Err(Error::Failed(e));
            };
            // The earlier failures stand; say why the rerun did not replace them.
            self.stdout.push_str(&format!("rerun failed: {e}\n"));
            for r in self
                .results
                .iter_mut()
                .filter(|r| self.next.items.iter().any(|i| r["name"] == item_name(i)))
            {
                r["rerun_error"] = Value::String(e.clone());
            }
            before.stdout = std::mem::take(&mut self.stdout);
            before.results = std::mem::take(&mut self.results);
            before.attempts = self.attempts;
            return Ok(Some(before));
        }
        eprintln!(
            "[testhost] attempt {} ended without an exit status; retrying{}. Reason:\n{}",
            self.attempts,
            if next.items != self.next.items {
                " with what had not finished"
            } else {
                ""
            },
            self.deaths.last().map(String::as_str).unwrap_or_default()
        );
        self.next = next;
        Ok(None)
    }

    fn finished(&mut self, mut run: RunOutput) -> Option<RunOutput> {
        self.take_stdout(&run.stdout.clone());
        let items = &self.job.items;
        let mut again = failed_items(&self.results, items, |r| {
            error_text(r).contains(TRIPLE_FAULT_EXIT)
        });
        if again.is_empty() && console_shows_stall(&run.console_log) {
            // L1 locked up for a while and came back; an item that failed meanwhile (its
            // guest stopped answering) gets the same second chance as a crashed guest.
            again = failed_items(&self.results, items, |_| true);
        }
        if run.mode == HostMode::Nested && !again.is_empty() && self.reruns < EMULATION_RERUNS {
            // The emulated host now and then crashes an L2 guest outright (a triple fault
            // with no panic message, QEMU's guests as well: QEMU's TCG emulation of SVM).
            self.reruns += 1;
            eprintln!(
                "[testhost] the emulated host crashed a guest or stalled: rerun {} of {} in a \
                 fresh test host",
                self.reruns,
                again.join(" ")
            );
            self.stdout
                .push_str(&format!("\n--- rerun {} ---\n", self.reruns));
            self.next = follow_up(&self.job, &again, self.notes.as_ref());
            self.deaths.clear();
            self.fruitless = 0;
            self.before_rerun = Some(run);
            return None;
        }
        // Every item passed in the end: the exit status of a part counts failures that a
        // rerun has since replaced.
        if self.reruns > 0
            && run.status != 0
            && items.iter().all(|i| {
                self.results
                    .iter()
                    .any(|r| r["name"] == item_name(i) && r["ok"] == true)
            })
        {
            run.status = 0;
        }
        run.stdout = std::mem::take(&mut self.stdout);
        run.results = std::mem::take(&mut self.results);
        run.attempts = self.attempts;
        Some(run)
    }
}

/// Adds `new` result lines to `results`: one of a name already there replaces it, the
/// old one going into its `earlier_attempts`.
fn merge(results: &mut Vec<Value>, new: Vec<Value>) {
    for mut r in new {
        let Some(old) = results.iter_mut().find(|o| o["name"] == r["name"]) else {
            results.push(r);
            continue;
        };
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

/// After an attempt that died having reported `reported`: the items that did not report,
/// starting from `notes`; the same job again when nothing reported (or the lines do not
/// match the items, or every item reported and only the exit status is missing).
fn resume(attempt: &Job, reported: &[Value], notes: Option<&Value>) -> Job {
    let items = &attempt.items;
    // A batch reports its items in order, one line each.
    let in_order = reported
        .iter()
        .zip(items)
        .all(|(r, item)| r["name"] == item_name(item));
    if reported.is_empty() || reported.len() >= items.len() || !in_order {
        return attempt.clone();
    }
    follow_up(attempt, &items[reported.len()..], notes)
}

/// `job` with only `items`, starting from `notes` (replacing any it had) when given: the
/// shape of both a resumed batch and a rerun.
fn follow_up(job: &Job, items: &[String], notes: Option<&Value>) -> Job {
    let mut next = job.clone();
    next.items = items.to_vec();
    if let Some(notes) = notes {
        let key = crate::scenarios::ENV_NOTES;
        next.env.retain(|(k, _)| k != key);
        next.env.push((key.into(), notes.to_string()));
    }
    next
}

fn item_name(item: &str) -> &str {
    item.split(':').next().unwrap_or("")
}

/// The items whose result is a failure for which `why` holds.
fn failed_items(results: &[Value], items: &[String], why: impl Fn(&Value) -> bool) -> Vec<String> {
    items
        .iter()
        .filter(|item| {
            results
                .iter()
                .any(|r| r["name"] == item_name(item) && r["ok"] != true && why(r))
        })
        .cloned()
        .collect()
}

/// The error for a job whose every attempt died: one line per attempt first (error
/// output gets cut short), then each attempt's details.
fn attempts_failed(failures: &[String]) -> String {
    let mut s = format!(
        "the test host died without an exit status {} times in a row:\n",
        failures.len()
    );
    for (i, why) in failures.iter().enumerate() {
        s.push_str(&format!(
            "  attempt {}: {}\n",
            i + 1,
            why.lines().next().unwrap_or_default()
        ));
    }
    for (i, why) in failures.iter().enumerate().rev() {
        s.push_str(&format!("== attempt {} ==\n{why}\n", i + 1));
    }
    s
}

/// One line per attempt of each item that failed in the end: the short story of a
/// failed batch, which the long report before it can push out of sight.
pub fn attempt_summary(results: &[Value]) -> String {
    let mut s = String::new();
    let first_line = |t: &str| t.lines().next().unwrap_or_default().to_string();
    for r in results.iter().filter(|r| r["ok"] != true) {
        let name = r["name"].as_str().unwrap_or("?");
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::TAG;
    use std::path::PathBuf;

    fn batch_of(items: &[&str]) -> Job {
        Job {
            argv: vec!["/r".into(), "--json".into(), "batch".into()],
            items: items.iter().map(|s| s.to_string()).collect(),
            env: vec![("K".into(), "v".into())],
            ..Job::default()
        }
    }

    fn lines(json: &[&str]) -> String {
        json.iter().map(|j| format!("{TAG}{j}\n")).collect()
    }

    fn finished(stdout: String, status: i32) -> Outcome {
        Outcome::Finished(RunOutput {
            mode: HostMode::Nested,
            status,
            stdout,
            stderr: String::new(),
            console_log: String::new(),
            out_dir: PathBuf::new(),
            attempts: 1,
            timings: Default::default(),
            results: Vec::new(),
        })
    }

    fn died(stdout: String) -> Outcome {
        Outcome::Died {
            why: "L1 died".into(),
            stdout,
        }
    }

    #[test]
    fn a_resumed_batch_runs_what_did_not_report_with_the_notes_so_far() {
        let mut r = Retry::new(&batch_of(&["a", "b:x=1", "c"]));
        // L1 died in the middle of b (its result line cut short).
        let out = format!(
            "{}{TAG}{{\"name\":\"b",
            lines(&[r#"{"name":"a","ok":true,"notes":{"m":5}}"#])
        );
        assert!(r.after(died(out)).unwrap().is_none());
        assert_eq!(r.next.items, ["b:x=1", "c"]);
        assert!(r.next.env.contains(&("K".into(), "v".into())));
        let notes_env = (
            crate::scenarios::ENV_NOTES.to_string(),
            "{\"m\":5}".to_string(),
        );
        assert!(r.next.env.contains(&notes_env));
        // Died again after b: the newest notes replace the old ones.
        let out = lines(&[r#"{"name":"b","ok":false,"notes":{"m":6}}"#]);
        assert!(r.after(died(out)).unwrap().is_none());
        assert_eq!(r.next.items, ["c"]);
        let notes: Vec<_> = r
            .next
            .env
            .iter()
            .filter(|(k, _)| k == crate::scenarios::ENV_NOTES)
            .collect();
        assert_eq!(notes, [&(notes_env.0.clone(), "{\"m\":6}".into())]);
        let done = r
            .after(finished(lines(&[r#"{"name":"c","ok":true}"#]), 1))
            .unwrap()
            .unwrap();
        assert_eq!(done.attempts, 3);
        assert_eq!(done.results.len(), 3);
        assert_eq!(done.status, 1, "no rerun: the status stands");
    }

    #[test]
    fn a_batch_without_usable_progress_is_run_again_whole_then_given_up() {
        let first = batch_of(&["a", "b"]);
        let same = |stdout: &str| {
            let mut r = Retry::new(&first);
            r.after(died(stdout.to_string())).unwrap();
            r.next.items == first.items
        };
        assert!(same(""), "nothing reported");
        assert!(
            same(&lines(&[r#"{"name":"b","ok":true}"#])),
            "not in item order"
        );
        assert!(
            same(&lines(&[
                r#"{"name":"a","ok":true}"#,
                r#"{"name":"b","ok":true}"#
            ])),
            "everything reported: only the exit status is missing"
        );
        let mut r = Retry::new(&first);
        assert!(r.after(died(String::new())).unwrap().is_none());
        let e = r.after(died(String::new())).unwrap_err().to_string();
        assert!(e.contains("2 times in a row"), "{e}");
    }

    #[test]
    fn only_crashed_items_are_rerun_and_keep_each_failure() {
        let mut r = Retry::new(&batch_of(&["a:x=1", "b", "c"]));
        let crash = format!(r#"{{"name":"a","ok":false,"error":"vCPU 0: {TRIPLE_FAULT_EXIT}"}}"#);
        let first = lines(&[
            &crash,
            r#"{"name":"b","ok":false,"error":"RSS stayed high"}"#,
            r#"{"name":"c","ok":true,"notes":{"n":1}}"#,
        ]);
        assert!(r.after(finished(first, 1)).unwrap().is_none());
        assert_eq!(r.next.items, ["a:x=1"]);
        assert!(r
            .next
            .env
            .contains(&(crate::scenarios::ENV_NOTES.into(), "{\"n\":1}".into())));
        assert!(r.after(finished(lines(&[&crash]), 1)).unwrap().is_none());
        let done = r
            .after(finished(
                lines(&[r#"{"name":"a","ok":false,"error":"hang\nmore"}"#]),
                1,
            ))
            .unwrap()
            .unwrap();
        let a = &done.results[0];
        assert_eq!(a["earlier_attempts"].as_array().unwrap().len(), 2);
        assert!(a["earlier_attempts"][1].get("earlier_attempts").is_none());
        assert_eq!(
            attempt_summary(&done.results),
            format!(
                "a attempt 1: vCPU 0: {TRIPLE_FAULT_EXIT}\na attempt 2: vCPU 0: \
                 {TRIPLE_FAULT_EXIT}\na attempt 3: hang\nb attempt 1: RSS stayed high\n"
            )
        );
        assert_eq!(done.stdout.matches("\"name\":\"c\"").count(), 1);
    }

    #[test]
    fn a_successful_rerun_makes_the_batch_pass() {
        let mut r = Retry::new(&batch_of(&["a", "b"]));
        let crash = format!(r#"{{"name":"a","ok":false,"error":"{TRIPLE_FAULT_EXIT}"}}"#);
        let first = lines(&[&crash, r#"{"name":"b","ok":true}"#]);
        assert!(r.after(finished(first, 1)).unwrap().is_none());
        let done = r
            .after(finished(lines(&[r#"{"name":"a","ok":true}"#]), 0))
            .unwrap()
            .unwrap();
        assert_eq!(done.status, 0);
        assert_eq!(attempt_summary(&done.results), "");
    }
}
