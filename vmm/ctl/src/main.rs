//! `ebb-ctl`: control a running Ebb VM through its API socket.
//!
//! ```text
//! ebb-ctl --api-socket PATH balloon set SIZE | balloon get | balloon stats |
//!         balloon interval SECS | vm info | vm shutdown | vm stop | metrics |
//!         bench [--requests N] [--idle-seconds S]        [--json] [--timeout SECS]
//! ```

use std::process::ExitCode;

use ebb_ctl as ctl;

fn main() -> ExitCode {
    let args = match ctl::parse_args(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => {
            // --help and --version are "errors" that print to stdout and succeed.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                ctl::EXIT_USAGE as u8
            } else {
                0
            });
        }
    };
    let code = ctl::run(&args, &mut std::io::stdout(), &mut std::io::stderr());
    ExitCode::from(code as u8)
}
