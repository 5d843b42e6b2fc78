//! End-to-end scenarios: functions that boot real guests (inside the test host, see
//! [`crate::testhost`]) and check what Ebb does, each returning a JSON object of what it
//! measured or an error saying what went wrong.
//!
//! Scenarios come in families, one module each, every module exporting
//! `pub const SCENARIOS: &[ScenarioDef]`. A runner binary lists the families it offers and
//! calls [`main`]; `ebb-scenario` offers them all. To add a family: write a module here
//! (`pub mod api;`) and add `api::SCENARIOS` to the runner's list.
//!
//! ```text
//! RUNNER [--json] <name> [key=value ...]
//! RUNNER [--json] batch <name>[:key=value...] ...   several scenarios, one L1 boot
//! RUNNER list
//! ```
//! Each scenario prints one result line on stdout: with `--json` a tagged JSON line of
//! [`crate::results`] (`job` `scenario`, `name`, `ok`, `run_dir`, and `scenario`, `ms`,
//! `host`, `data` or `error`, `notes`), else a readable summary. Progress
//! goes to stderr. The exit status is 0 when every scenario passed, 1 otherwise, 2 on
//! usage errors. Missing pieces (guest artifacts, the ebb binary, QEMU, /dev/kvm) fail
//! the scenario with a message saying how to get them; nothing is skipped.
//!
//! Scenarios of one batch run in order in one process and may pass facts on through
//! [`Ctx::note`] / [`Ctx::recall`] (e.g. a baseline measured by an earlier scenario);
//! each must still work alone. JSON result lines carry the facts noted so far
//! (`"notes"`), and a runner started with them in `EBB_SCENARIO_NOTES` begins with them:
//! that is how a batch resumed in a fresh test host keeps what its first part measured.

pub mod api;
pub mod backings;
pub mod balloon;
pub mod batch;
pub mod bench;
pub mod boot;
pub mod cli;
pub mod compaction;
pub mod disk;
pub mod footprint;
pub mod hinting;
pub mod host;
pub mod hostile;
pub mod merge;
pub mod policy;
pub mod reporting;
pub mod support;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use serde_json::{json, Value};

use crate::testhost;

/// Facts noted by earlier scenarios (a JSON object), for a runner that continues a batch.
pub const ENV_NOTES: &str = "EBB_SCENARIO_NOTES";

/// What every scenario gets.
pub struct Ctx {
    /// `direct`, `nested`, or `unknown` (not started through the harness).
    pub host: String,
    notes: RefCell<BTreeMap<String, Value>>,
}

impl Ctx {
    pub fn new(host: impl Into<String>) -> Ctx {
        Ctx {
            host: host.into(),
            notes: RefCell::new(BTreeMap::new()),
        }
    }

    /// The context of a runner started by the harness (`EBB_SCENARIO_HOST`, and
    /// [`ENV_NOTES`] when it continues a batch).
    pub fn from_env() -> Ctx {
        let ctx = Ctx::new(
            std::env::var(testhost::ENV_SCENARIO_HOST).unwrap_or_else(|_| "unknown".into()),
        );
        if let Ok(text) = std::env::var(ENV_NOTES) {
            if let Err(e) = ctx.load_notes(&text) {
                // Only costs the later scenarios a re-measurement.
                progress(&format!("ignoring {ENV_NOTES}: {e}"));
            }
        }
        ctx
    }

    /// Starts from the notes in `text` (a JSON object, as result lines carry them).
    fn load_notes(&self, text: &str) -> Result<(), String> {
        let notes: BTreeMap<String, Value> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
        *self.notes.borrow_mut() = notes;
        Ok(())
    }

    /// Everything noted so far.
    pub fn notes(&self) -> Value {
        json!(*self.notes.borrow())
    }

    /// Leaves a fact for later scenarios of the same batch.
    pub fn note(&self, key: &str, value: Value) {
        self.notes.borrow_mut().insert(key.to_string(), value);
    }

    /// A fact an earlier scenario of the batch left.
    pub fn recall(&self, key: &str) -> Option<Value> {
        self.notes.borrow().get(key).cloned()
    }
}

/// `key=value` arguments of one scenario.
pub struct Args(BTreeMap<String, String>);

impl Args {
    pub fn parse(items: &[String]) -> Result<Args, String> {
        let mut map = BTreeMap::new();
        for item in items {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| format!("argument {item:?} is not key=value"))?;
            map.insert(k.to_string(), v.to_string());
        }
        Ok(Args(map))
    }

    pub fn get<T: std::str::FromStr>(&self, key: &str, default: T) -> Result<T, String> {
        match self.0.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| format!("bad value {v:?} for argument {key}")),
        }
    }

    pub fn check_known(&self, known: &[&str]) -> Result<(), String> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!(
                "unknown argument {k:?} (known: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )),
            None => Ok(()),
        }
    }
}

pub type ScenarioFn = fn(&Ctx, &Args) -> Result<Value, String>;

/// One scenario: its name, a one-line description (with its arguments), the function.
pub struct ScenarioDef {
    pub name: &'static str,
    pub help: &'static str,
    pub run: ScenarioFn,
}

/// Progress on stderr (it shows in the run's `stderr` and, live, nowhere else).
pub fn progress(msg: &str) {
    eprintln!("[ebb-scenario] {msg}");
}

pub use crate::util::ms;

fn find<'a>(families: &[&'a [ScenarioDef]], name: &str) -> Option<&'a ScenarioDef> {
    families
        .iter()
        .flat_map(|f| f.iter())
        .find(|d| d.name == name)
}

fn usage(families: &[&[ScenarioDef]]) -> String {
    let mut s = String::from(
        "usage: RUNNER [--json] <name> [key=value ...]\n       \
         RUNNER [--json] batch <name>[:key=value...] ...\n       \
         RUNNER list\nscenarios:\n",
    );
    for d in families.iter().flat_map(|f| f.iter()) {
        s.push_str(&format!("  {:<24} {}\n", d.name, d.help));
    }
    s
}

/// Runs one scenario and prints its result line; true when it passed.
pub fn run_one(
    ctx: &Ctx,
    families: &[&[ScenarioDef]],
    name: &str,
    args: &[String],
    json_out: bool,
) -> bool {
    let started = Instant::now();
    let result = match find(families, name) {
        None => Err(format!("unknown scenario {name:?}\n{}", usage(families))),
        Some(def) => match Args::parse(args) {
            Err(e) => Err(e),
            Ok(args) => {
                progress(&format!("{name}: start"));
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (def.run)(ctx, &args)))
                    .unwrap_or_else(|p| {
                        let msg = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "panic".into());
                        Err(format!("scenario panicked: {msg}"))
                    })
            }
        },
    };
    let elapsed = ms(started.elapsed());
    let ok = result.is_ok();
    let mut line = json!({
        "scenario": name,
        "ms": elapsed,
        "host": ctx.host,
    });
    match result {
        Ok(data) => {
            progress(&format!("{name}: ok in {elapsed} ms"));
            line["data"] = data;
        }
        Err(e) => {
            progress(&format!("{name}: FAILED: {e}"));
            line["error"] = Value::String(e);
        }
    }
    if !ctx.notes.borrow().is_empty() {
        line["notes"] = ctx.notes();
    }
    if json_out {
        crate::results::emit("scenario", name, ok, line);
    } else if ok {
        println!("{name}: ok in {elapsed} ms: {}", line["data"]);
    } else {
        println!("{name}: FAILED in {elapsed} ms: {}", line["error"]);
    }
    ok
}

/// The runner's command line (`args` without the program name).
pub fn main_with_args(families: &[&[ScenarioDef]], args: Vec<String>) -> ExitCode {
    let mut json_out = false;
    let mut rest: Vec<String> = Vec::new();
    for a in args {
        if a == "--json" {
            json_out = true;
        } else {
            rest.push(a);
        }
    }
    let ctx = Ctx::from_env();
    let Some(first) = rest.first() else {
        eprint!("{}", usage(families));
        return ExitCode::from(2);
    };
    let all_ok = match first.as_str() {
        "list" | "--help" | "-h" | "help" => {
            print!("{}", usage(families));
            true
        }
        "batch" => {
            if rest.len() < 2 {
                eprint!("batch needs scenario names\n{}", usage(families));
                return ExitCode::from(2);
            }
            let mut all = true;
            for item in &rest[1..] {
                let mut parts = item.split(':').map(String::from);
                let name = parts.next().unwrap_or_default();
                let args: Vec<String> = parts.collect();
                all &= run_one(&ctx, families, &name, &args, json_out);
            }
            all
        }
        name => run_one(&ctx, families, name, &rest[1..], json_out),
    };
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// [`main_with_args`] with the process's arguments.
pub fn main(families: &[&[ScenarioDef]]) -> ExitCode {
    main_with_args(families, std::env::args().skip(1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(_: &Ctx, a: &Args) -> Result<Value, String> {
        a.check_known(&["x"])?;
        Ok(json!({ "x": a.get("x", 1u32)? }))
    }

    const FAMILY: &[ScenarioDef] = &[ScenarioDef {
        name: "t-ok",
        help: "test",
        run: ok,
    }];

    #[test]
    fn args_parse_and_check() {
        let a = Args::parse(&["x=3".into()]).unwrap();
        assert_eq!(a.get("x", 0u32).unwrap(), 3);
        assert_eq!(a.get("y", 7u32).unwrap(), 7);
        assert!(a.check_known(&["y"]).is_err());
        assert!(Args::parse(&["novalue".into()]).is_err());
        let bad = Args::parse(&["x=abc".into()]).unwrap();
        assert!(bad.get("x", 0u32).is_err());
    }

    #[test]
    fn runs_and_reports() {
        let ctx = Ctx::new("unit");
        assert!(run_one(&ctx, &[FAMILY], "t-ok", &["x=2".into()], true));
        assert!(!run_one(&ctx, &[FAMILY], "t-ok", &["z=2".into()], true));
        assert!(!run_one(&ctx, &[FAMILY], "missing", &[], true));
        ctx.note("k", json!(5));
        assert_eq!(ctx.recall("k"), Some(json!(5)));
    }

    #[test]
    fn notes_pass_on_to_a_fresh_runner() {
        let first = Ctx::new("unit");
        first.note("k", json!(5));
        first.note("s", json!("x"));
        let later = Ctx::new("unit");
        later.load_notes(&first.notes().to_string()).unwrap();
        assert_eq!(later.recall("k"), Some(json!(5)));
        assert_eq!(later.recall("s"), Some(json!("x")));
        assert!(later.load_notes("[1]").is_err());
        assert_eq!(
            later.recall("k"),
            Some(json!(5)),
            "a bad text changes nothing"
        );
    }
}
