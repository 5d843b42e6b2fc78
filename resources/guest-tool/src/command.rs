//! Parsing of console command lines and of the `ebb.run=` kernel command-line key.

use std::time::Duration;

/// Largest amount `touch`/`alloc` accept (1 TiB), to reject typos early.
pub const MAX_MIB: u64 = 1 << 20;
/// Longest `sleep` accepted, in seconds.
pub const MAX_SLEEP_SECS: f64 = 86_400.0;

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Echo(String),
    Touch(u64),
    Free,
    Alloc(u64),
    Meminfo,
    Balloon,
    Cpus,
    /// CPU time so far, from /proc/stat.
    Cpustat,
    Sh(String),
    Sleep(Duration),
    Poweroff,
    Reboot,
    /// A checksummed working set of MIB MiB churned for a while (see `churn.rs`).
    Churn(u64, Duration),
    /// Drive the balloon device as a hostile driver would (see `hostile.rs`).
    Hostile(crate::hostile::Mode, Duration),
}

impl Command {
    /// The command name as it appears in `"cmd"`.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Echo(_) => "echo",
            Command::Touch(_) => "touch",
            Command::Free => "free",
            Command::Alloc(_) => "alloc",
            Command::Meminfo => "meminfo",
            Command::Balloon => "balloon",
            Command::Cpus => "cpus",
            Command::Cpustat => "cpustat",
            Command::Sh(_) => "sh",
            Command::Sleep(_) => "sleep",
            Command::Poweroff => "poweroff",
            Command::Reboot => "reboot",
            Command::Hostile(..) => "hostile",
            Command::Churn(..) => "churn",
        }
    }
}

/// A line that names a command but cannot be run; `cmd` is the name as given.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    pub cmd: String,
    pub error: String,
}

fn err(cmd: &str, error: impl Into<String>) -> ParseError {
    ParseError {
        cmd: cmd.to_string(),
        error: error.into(),
    }
}

fn parse_mib(cmd: &str, rest: &str) -> Result<u64, ParseError> {
    if rest.is_empty() {
        return Err(err(cmd, format!("usage: {cmd} MIB")));
    }
    match rest.parse::<u64>() {
        Ok(n) if (1..=MAX_MIB).contains(&n) => Ok(n),
        _ => Err(err(
            cmd,
            format!("MIB must be an integer from 1 to {MAX_MIB}, got {rest:?}"),
        )),
    }
}

fn parse_secs(rest: &str) -> Result<Duration, ParseError> {
    if rest.is_empty() {
        return Err(err("sleep", "usage: sleep SECS"));
    }
    match rest.parse::<f64>() {
        Ok(s) if s.is_finite() && (0.0..=MAX_SLEEP_SECS).contains(&s) => {
            Ok(Duration::from_secs_f64(s))
        }
        _ => Err(err(
            "sleep",
            format!("SECS must be a number from 0 to {MAX_SLEEP_SECS}, got {rest:?}"),
        )),
    }
}

fn no_args(cmd: Command, rest: &str) -> Result<Command, ParseError> {
    if rest.is_empty() {
        Ok(cmd)
    } else {
        Err(err(
            cmd.name(),
            format!("{} takes no arguments", cmd.name()),
        ))
    }
}

/// Parses one console line. `None` for a blank line (nothing to answer).
///
/// The first word is the command; the rest of the line (trimmed) is its argument text, kept
/// verbatim for `echo` and `sh`.
pub fn parse_line(line: &str) -> Option<Result<Command, ParseError>> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let (name, rest) = match line.find(char::is_whitespace) {
        Some(i) => (&line[..i], line[i..].trim()),
        None => (line, ""),
    };
    Some(match name {
        "echo" => Ok(Command::Echo(rest.to_string())),
        "touch" => parse_mib(name, rest).map(Command::Touch),
        "alloc" => parse_mib(name, rest).map(Command::Alloc),
        "free" => no_args(Command::Free, rest),
        "meminfo" => no_args(Command::Meminfo, rest),
        "balloon" => no_args(Command::Balloon, rest),
        "cpus" => no_args(Command::Cpus, rest),
        "cpustat" => no_args(Command::Cpustat, rest),
        "sh" if rest.is_empty() => Err(err(name, "usage: sh CMD...")),
        "sh" => Ok(Command::Sh(rest.to_string())),
        "sleep" => parse_secs(rest).map(Command::Sleep),
        "hostile" => {
            let (mode, secs) = rest.split_once(' ').unwrap_or((rest, ""));
            match (crate::hostile::Mode::parse(mode), parse_secs(secs.trim())) {
                (Some(mode), Ok(d)) => Ok(Command::Hostile(mode, d)),
                _ => Err(err(
                    "hostile",
                    "usage: hostile inflate|report|stats|malformed SECS",
                )),
            }
        }
        "churn" => {
            let (mib, secs) = rest.split_once(' ').unwrap_or((rest, ""));
            match (parse_mib(name, mib), parse_secs(secs.trim())) {
                (Ok(mib), Ok(d)) => Ok(Command::Churn(mib, d)),
                _ => Err(err("churn", "usage: churn MIB SECS")),
            }
        }
        "poweroff" => no_args(Command::Poweroff, rest),
        "reboot" => no_args(Command::Reboot, rest),
        _ => Err(err(name, "unknown command")),
    })
}

/// Splits a kernel command line into parameters the way the kernel does: words separated by
/// whitespace, double quotes group (and are removed).
pub fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// The commands of every `ebb.run=` key on the kernel command line, in order, each turned
/// into its console form (`touch:64` -> `touch 64`). Empty items are skipped.
pub fn ebb_run_lines(cmdline: &str) -> Vec<String> {
    split_cmdline(cmdline)
        .iter()
        .filter_map(|p| p.strip_prefix("ebb.run="))
        .flat_map(|v| v.split(','))
        .map(|item| {
            item.split(':')
                .filter(|a| !a.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|l| !l.trim().is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(line: &str) -> Command {
        parse_line(line).unwrap().unwrap()
    }

    fn bad(line: &str) -> ParseError {
        parse_line(line).unwrap().unwrap_err()
    }

    #[test]
    fn parses_commands() {
        assert_eq!(
            ok("echo hello  world "),
            Command::Echo("hello  world".into())
        );
        assert_eq!(ok("echo"), Command::Echo(String::new()));
        assert_eq!(ok("touch 256"), Command::Touch(256));
        assert_eq!(ok("  alloc\t64\r"), Command::Alloc(64));
        assert_eq!(ok("free"), Command::Free);
        assert_eq!(ok("meminfo"), Command::Meminfo);
        assert_eq!(ok("balloon"), Command::Balloon);
        assert_eq!(ok("cpus"), Command::Cpus);
        assert_eq!(ok("cpustat"), Command::Cpustat);
        assert_eq!(
            ok("sh echo \"a  b\" | wc -c"),
            Command::Sh("echo \"a  b\" | wc -c".into())
        );
        assert_eq!(ok("sleep 1.5"), Command::Sleep(Duration::from_millis(1500)));
        assert_eq!(ok("sleep 0"), Command::Sleep(Duration::ZERO));
        assert_eq!(ok("poweroff"), Command::Poweroff);
        assert_eq!(ok("reboot"), Command::Reboot);
        assert_eq!(
            parse_line("hostile inflate 60"),
            Some(Ok(Command::Hostile(
                crate::hostile::Mode::Inflate,
                Duration::from_secs(60)
            )))
        );
        assert!(matches!(parse_line("hostile explode 5"), Some(Err(_))));
        assert!(matches!(parse_line("hostile report"), Some(Err(_))));
        assert_eq!(
            ok("churn 512 30"),
            Command::Churn(512, Duration::from_secs(30))
        );
        assert_eq!(bad("churn 512").error, "usage: churn MIB SECS");
        assert_eq!(bad("churn 0 5").error, "usage: churn MIB SECS");
    }

    #[test]
    fn blank_lines_are_ignored() {
        assert!(parse_line("").is_none());
        assert!(parse_line(" \t\r").is_none());
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(bad("frobnicate 3").cmd, "frobnicate");
        assert_eq!(bad("frobnicate 3").error, "unknown command");
        assert_eq!(bad("touch").cmd, "touch");
        assert!(bad("touch").error.contains("usage"));
        assert!(bad("touch 0").error.contains("MIB"));
        assert!(bad("touch -1").error.contains("MIB"));
        assert!(bad("touch 12x").error.contains("MIB"));
        assert!(bad("alloc 99999999999").error.contains("MIB"));
        assert_eq!(bad("free now").error, "free takes no arguments");
        assert_eq!(bad("sh").cmd, "sh");
        assert_eq!(bad("sleep").cmd, "sleep");
        assert!(bad("sleep -1").error.contains("SECS"));
        assert!(bad("sleep nan").error.contains("SECS"));
        assert!(bad("sleep inf").error.contains("SECS"));
        assert_eq!(bad("TOUCH 1").error, "unknown command");
    }

    #[test]
    fn splits_kernel_cmdline() {
        assert_eq!(
            split_cmdline("console=ttyS0  panic=-1 x=\"a b\" \"q r\"=1\n"),
            vec!["console=ttyS0", "panic=-1", "x=a b", "q r=1"]
        );
        assert!(split_cmdline("   ").is_empty());
    }

    #[test]
    fn parses_ebb_run() {
        assert_eq!(
            ebb_run_lines("console=ttyS0 ebb.run=touch:768,free,sleep:5,poweroff panic=-1\n"),
            vec!["touch 768", "free", "sleep 5", "poweroff"]
        );
        assert_eq!(
            ebb_run_lines("ebb.run=echo:a ebb.run=,sh:echo:hi,, other.run=x"),
            vec!["echo a", "sh echo hi"]
        );
        assert_eq!(
            ebb_run_lines("ebb.run=\"sh:echo a b\",free"),
            vec!["sh echo a b", "free"]
        );
        assert!(ebb_run_lines("console=ttyS0 xebb.run=free ebb.run=").is_empty());
        for line in ebb_run_lines("ebb.run=touch:64,free,poweroff") {
            assert!(parse_line(&line).unwrap().is_ok(), "{line}");
        }
    }
}
