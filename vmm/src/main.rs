//! `ebb`: boot a Linux guest.

use std::process::ExitCode;

use clap::Parser;
use ebb_devices::exit::VmExit;
use ebb_vmm::cli::Cli;
use ebb_vmm::config::SerialConfig;
use ebb_vmm::console::RawTerminal;
use ebb_vmm::{signals, vm};

/// Exit status when the VM could not start (bad input, host problems).
const EXIT_START_FAILED: u8 = 1;
/// Exit status when the guest crashed or a vCPU failed.
const EXIT_GUEST_FAILED: u8 = 2;

/// A command-line mistake as one `ebb: error:` line (clap's own report spans several
/// lines and exits with 2, the guest-crash status). Help and version print as usual.
fn parse_cli() -> Result<Cli, String> {
    match Cli::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => Err(e
            .to_string()
            .lines()
            .map(str::trim)
            .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
            .filter(|l| !l.is_empty())
            .map(|l| l.strip_prefix("error: ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join(" ")),
    }
}

/// Ebb's own messages at `level` and above on stderr. Libraries that log per guest action
/// are silenced: virtio-queue logs every unaligned ring address a guest writes, which Ebb
/// counts and rate-limits itself (`ebb_devices::faults`).
fn init_logging(level: tracing::Level) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = Targets::new()
        .with_default(level)
        .with_target("virtio_queue", LevelFilter::OFF);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_target(false),
        )
        .with(filter)
        .init();
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("ebb: error: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    init_logging(cli.log_level);
    let config = cli.vm_config();

    let signal_fd = match signals::block_stop_signals() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("ebb: cannot set up signal handling: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    let mut terminal = (config.serial == SerialConfig::Stdio).then(RawTerminal::enter);
    let result = vm::run(&config, signal_fd);
    if let Some(t) = terminal.as_mut() {
        t.restore();
    }

    let code = match result {
        Ok(VmExit::PowerOff) => {
            eprintln!("ebb: guest powered off");
            0
        }
        Ok(VmExit::Reset) => {
            eprintln!("ebb: guest rebooted; Ebb does not restart guests, exiting");
            0
        }
        Ok(VmExit::Crash(why)) => {
            eprintln!("ebb: guest stopped: {why}");
            EXIT_GUEST_FAILED
        }
        Ok(VmExit::Stopped(why)) => {
            eprintln!("ebb: stopped by {why}");
            signals::signal_number(&why)
                .map(|n| 128 + n as u8)
                .unwrap_or(0)
        }
        Err(e) => {
            eprintln!("ebb: error: {e}");
            EXIT_START_FAILED
        }
    };
    // vCPU threads may still be inside KVM_RUN; end the process rather than join them.
    std::process::exit(i32::from(code))
}
