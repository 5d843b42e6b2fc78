//! ebb-guest: the guest side of Ebb's default guest (see resources/GUEST-PROTOCOL.md).
//!
//! `ebb-guest init`   supervisor for PID 1 (started by /init): runs and restarts the server,
//!                    handles Ctrl-Alt-Del and the power button.
//! `ebb-guest serve`  the console command server; prints EBB-READY and runs `ebb.run=` first
//!                    unless started with `--restarted`.

mod churn;
mod command;
mod hostile;
mod init;
mod json;
mod procfs;
mod server;
mod sys;
mod worker;

const USAGE: &str = "usage: ebb-guest init | serve [--restarted]";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let code = match args.as_slice() {
        ["init"] => init::run(),
        ["serve"] => server::run(true),
        ["serve", "--restarted"] => server::run(false),
        ["-h" | "--help" | "help"] => {
            println!("{USAGE}");
            0
        }
        _ => {
            eprintln!("{USAGE}");
            2
        }
    };
    std::process::exit(code);
}
