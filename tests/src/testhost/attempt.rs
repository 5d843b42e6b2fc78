//! One attempt at a job: a boot of L1 that runs it ([`nested`]), or a child process on
//! this machine ([`direct`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use super::console::{ConsoleWatch, Follow};
use super::l1::L1;
use super::rundir::{harness_env, job_script, nested_env, read_lossy};
use super::{report, setup_err, Error, HostMode, Job, RunOutput, RunTimings};
use crate::text::{indent, tail};
use crate::util::{run_bounded, status_code, LineSink, Tee};

/// How long L1 may take to power off after the job's status was written.
const POWEROFF_GRACE: Duration = Duration::from_secs(30);

/// L1's init rewrites `l1-heartbeat` in the run directory every 5 s while the job runs.
/// The emulated host sometimes freezes whole, with nothing on its console (seen in a CI
/// run of `hint-corruption`); this long without a new beat, it counts as dead.
const HEARTBEAT_LIMIT: Duration = Duration::from_secs(90);

/// Follows L1's heartbeat file.
#[derive(Default)]
struct Heartbeat {
    /// The last content seen and when it was first seen.
    last: Option<(String, Instant)>,
}

impl Heartbeat {
    /// Takes one look at the file's `content`; `Some(silence)` once the beat stopped for
    /// longer than `limit`. No verdict before the first beat (an init without one, or an
    /// L1 still booting: other limits cover that).
    fn look(&mut self, content: Option<String>, now: Instant, limit: Duration) -> Option<Duration> {
        if let Some(c) = content.filter(|c| !c.trim().is_empty()) {
            if self.last.as_ref().is_none_or(|(seen, _)| *seen != c) {
                self.last = Some((c, now));
            }
        }
        let (_, since) = self.last.as_ref()?;
        let silence = now.duration_since(*since);
        (silence > limit).then_some(silence)
    }
}

/// How an attempt ended, when it did not fail for good.
pub enum Outcome {
    /// The job ran and left its exit status.
    Finished(RunOutput),
    /// L1 died, stalled or never reached the job: worth another attempt.
    Died {
        why: String,
        /// What the job wrote to stdout before the attempt ended.
        stdout: String,
    },
}

// ---------------------------------------------------------------------------------------
// Direct mode

/// Runs the job here as a child process; past its timeout it is killed and the run fails.
pub fn direct(job: &Job, dir: &Path) -> Result<Outcome, Error> {
    let argv = job.command_line();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .current_dir(job.working_dir())
        .envs(harness_env(HostMode::Direct, dir))
        .envs(job.env.iter().map(|(k, v)| (k, v)));
    let tee = Tee {
        stdout_file: Some(dir.join("stdout")),
        stderr_file: Some(dir.join("stderr")),
        on_stdout_line: job
            .on_stdout_line
            .map(|f| Box::new(move |l: &str| f(l)) as LineSink),
    };
    let done = run_bounded(&mut cmd, job.timeout, tee)
        .map_err(setup_err(format!("running {:?}", argv[0])))?;
    let Some(status) = done.status else {
        return Err(Error::Timeout(format!(
            "{argv:?} did not finish within {:?} (direct mode, run dir {})\n{}",
            job.timeout,
            dir.display(),
            report(&done.stdout, &done.stderr, "")
        )));
    };
    let status = status_code(status);
    let _ = fs::write(dir.join("status"), format!("{status}\n"));
    Ok(Outcome::Finished(RunOutput {
        mode: HostMode::Direct,
        status,
        stdout: done.stdout,
        stderr: done.stderr,
        console_log: String::new(),
        out_dir: dir.to_path_buf(),
        attempts: 1,
        timings: RunTimings {
            scenario: Some(done.elapsed),
            ..RunTimings::default()
        },
        results: Vec::new(),
    }))
}

// ---------------------------------------------------------------------------------------
// Nested mode

/// Boots L1 to run the job and watches it until it ends.
pub fn nested(l1: &L1, job: &Job, dir: &Path) -> Result<Outcome, Error> {
    let script = job_script(job, &nested_env(job, dir))?;
    fs::write(dir.join("scenario.sh"), script).map_err(setup_err("writing scenario.sh"))?;
    let mut cmd = l1.command(job.l1_memory_mib, &job.kvm_amd_params, dir)?;
    let _ = fs::write(dir.join("qemu.cmdline"), format!("{cmd:?}\n"));
    let spawned = Instant::now();
    let child = cmd
        .spawn()
        .map_err(setup_err(format!("spawning {:?}", cmd.get_program())))?;
    let mut run = NestedRun {
        job,
        dir: dir.to_path_buf(),
        child,
        spawned,
        console: ConsoleWatch::new(dir.join("console.log")),
        stdout: Follow::new(dir.join("stdout")),
        stderr_len: 0,
        last_output: None,
        finished: None,
        heartbeat: Heartbeat::default(),
    };
    let end = run.watch()?;
    run.conclude(end)
}

/// Why the watch of L1 ended.
enum End {
    /// L1's QEMU exited by itself.
    Exited(ExitStatus),
    /// The job's status is in, but L1 did not power off: killed.
    PoweroffOverdue,
    /// The attempt's time limit passed: killed.
    TimedOut,
    /// L1 stalled for good (the console line): killed.
    Stalled(String),
    /// The job printed nothing for its `quiet_timeout`: killed.
    Quiet(Duration),
    /// L1's heartbeat stopped for this long: killed.
    Frozen(Duration),
}

/// A running L1 and what it showed so far.
struct NestedRun<'a> {
    job: &'a Job,
    dir: PathBuf,
    child: Child,
    spawned: Instant,
    console: ConsoleWatch,
    /// The job's stdout, followed for progress and as a sign of life.
    stdout: Follow,
    /// Size of the job's stderr at the last look (growth is a sign of life).
    stderr_len: u64,
    /// When the job last printed something (or L1 started it).
    last_output: Option<Instant>,
    /// When the job's exit status (or its console marker) appeared.
    finished: Option<Instant>,
    heartbeat: Heartbeat,
}

impl NestedRun<'_> {
    fn watch(&mut self) -> Result<End, Error> {
        loop {
            if let Some(end) = self.step()? {
                return Ok(end);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// One look at L1: `Some` when the attempt is over (QEMU exited or was killed).
    fn step(&mut self) -> Result<Option<End>, Error> {
        self.console.poll();
        let lines = self.stdout.poll();
        let stderr_len = fs::metadata(self.dir.join("stderr")).map_or(0, |m| m.len());
        if !lines.is_empty() || stderr_len > self.stderr_len {
            self.stderr_len = stderr_len;
            self.console.job_output();
            self.last_output = Some(Instant::now());
        }
        if self.last_output.is_none() && self.console.started.is_some() {
            self.last_output = Some(Instant::now());
        }
        if let Some(f) = self.job.on_stdout_line {
            lines.iter().for_each(|l| f(l));
        }
        match self.child.try_wait() {
            Ok(Some(st)) => return Ok(Some(End::Exited(st))),
            Ok(None) => {}
            Err(e) => {
                self.kill();
                return Err(Error::Setup(format!("waiting for QEMU: {e}")));
            }
        }
        if self.finished.is_none()
            && (self.console.exited.is_some() || self.dir.join("status").exists())
        {
            self.finished = Some(Instant::now());
        }
        let beat = fs::read_to_string(self.dir.join("l1-heartbeat")).ok();
        // A job that may be quiet for long (a full host thrashing, which can starve the
        // heartbeat too) gets its own verdict first: `Quiet` is checked before `Frozen`.
        let limit = self
            .job
            .quiet_timeout
            .map_or(HEARTBEAT_LIMIT, |q| q.max(HEARTBEAT_LIMIT));
        let silence = self.heartbeat.look(beat, Instant::now(), limit);
        let end = if let Some(since) = self.finished {
            (since.elapsed() > POWEROFF_GRACE).then_some(End::PoweroffOverdue)
        } else if self.spawned.elapsed() > self.job.timeout {
            Some(End::TimedOut)
        } else if let Some(quiet) = self
            .job
            .quiet_timeout
            .filter(|q| self.last_output.is_some_and(|t| t.elapsed() > *q))
        {
            Some(End::Quiet(quiet))
        } else if let Some(silence) = silence {
            Some(End::Frozen(silence))
        } else {
            self.console.stalled().map(|l| End::Stalled(l.to_string()))
        };
        if end.is_some() {
            self.kill();
        }
        Ok(end)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What the attempt amounts to, from what L1 left in the run directory.
    fn conclude(mut self, end: End) -> Result<Outcome, Error> {
        let t_end = Instant::now();
        self.console.poll();
        let console_log = self.console.text();
        let stdout = read_lossy(&self.dir.join("stdout"));
        let stderr = read_lossy(&self.dir.join("stderr"));
        let status: Option<i32> = fs::read_to_string(self.dir.join("status"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        let qemu_log = read_lossy(&self.dir.join("qemu.log"));
        let mut details = format!(
            "run dir {}; QEMU {}\n",
            self.dir.display(),
            match &end {
                End::Exited(st) => format!("exited with {st}"),
                _ => "was killed".into(),
            }
        );
        if !qemu_log.trim().is_empty() {
            details.push_str(&format!(
                "--- QEMU output (tail) ---\n{}\n",
                indent(&tail(&qemu_log, 20))
            ));
        }
        details.push_str(&report(&stdout, &stderr, &console_log));
        let (started, exited) = (self.console.started, self.console.exited);

        if let Some(status) = status {
            return Ok(Outcome::Finished(RunOutput {
                mode: HostMode::Nested,
                status,
                stdout,
                stderr,
                console_log,
                out_dir: self.dir.clone(),
                attempts: 1,
                timings: RunTimings {
                    l1_boot_to_scenario: started.map(|t| t.duration_since(self.spawned)),
                    scenario: started.zip(exited).map(|(s, e)| e.duration_since(s)),
                    l1_shutdown: exited.map(|e| t_end.duration_since(e)),
                    ..RunTimings::default()
                },
                results: Vec::new(),
            }));
        }
        if let Some(line) = self.console.fatal.take() {
            return Err(Error::TestHost(format!("{line}\n{details}")));
        }
        let last_words = stderr.lines().last().unwrap_or_default().trim().to_string();
        let why = match end {
            End::Stalled(what) => format!(
                "L1 stalled (`{what}` on its console) and the job did not finish; last job \
                 output: `{last_words}`\n{details}"
            ),
            End::Frozen(silence) => format!(
                "L1 froze: no heartbeat for {:.0} s (its init writes one every 5 s) and the \
                 job did not finish; last job output: `{last_words}`\n{details}",
                silence.as_secs_f64()
            ),
            End::Quiet(quiet) => {
                return Err(Error::Timeout(format!(
                    "the job printed nothing for {quiet:?} (Job::quiet_timeout); last job \
                     output: `{last_words}`\n{details}"
                )))
            }
            End::TimedOut if started.is_some() => {
                return Err(Error::Timeout(format!(
                    "no exit status within {:?} (L1 boot and job; the limit is Job::timeout)\n\
                     {details}",
                    self.job.timeout
                )))
            }
            End::TimedOut => format!(
                "L1 did not reach the job within {:?}\n{details}",
                self.job.timeout
            ),
            End::Exited(_) | End::PoweroffOverdue => format!(
                "L1 ended without writing the job's exit status; last job output: \
                 `{last_words}`\n{details}"
            ),
        };
        Ok(Outcome::Died { why, stdout })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_that_stops_counts_as_frozen_only_after_the_limit() {
        let limit = Duration::from_secs(90);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let beat = |c: &str| Some(c.to_string());
        let mut h = Heartbeat::default();
        // No file yet (L1 booting), for however long: no verdict.
        assert_eq!(h.look(None, at(0), limit), None);
        assert_eq!(h.look(None, at(500), limit), None);
        assert_eq!(h.look(Some(String::new()), at(501), limit), None);
        // Beats that change keep it alive well past the limit.
        for i in 0..60 {
            assert_eq!(
                h.look(beat(&format!("{i}.00")), at(510 + 5 * i), limit),
                None
            );
        }
        // The same content is no beat: silent from the last change (at 805 s).
        assert_eq!(h.look(beat("59.00"), at(805 + 90), limit), None);
        assert_eq!(
            h.look(beat("59.00"), at(805 + 91), limit),
            Some(Duration::from_secs(91))
        );
        // An unreadable file (9p hiccup) does not reset the silence either.
        assert_eq!(
            h.look(None, at(805 + 95), limit),
            Some(Duration::from_secs(95))
        );
        // A new beat ends it.
        assert_eq!(h.look(beat("60.00"), at(805 + 96), limit), None);
    }
}
