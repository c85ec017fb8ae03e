//! The `twtrace` command. Everything lives in the library (src/lib.rs).

use std::process::ExitCode;

use clap::Parser;
use twtrace::{
    cli::{Cli, Command},
    failure, host, views,
};

fn main() -> ExitCode {
    // serve's collector process: the same binary under another name (see host::collect).
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name()
        == Some(std::ffi::OsStr::new(host::collect::COLLECTOR_NAME))
    {
        return host::collect::child_main();
    }
    // `exec` keeps the low codes for its command's own status: its own errors and bad usage
    // are 125, as env(1) and timeout(1) do (README "Exit codes").
    let exec = std::env::args_os().nth(1).is_some_and(|a| a == "exec");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            let code = match (e.use_stderr(), exec) {
                (false, _) => 0,
                (true, true) => failure::exec_code::FAILED,
                (true, false) => failure::Code::Usage as u8,
            };
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            twtrace::say!("cannot start the async runtime: {e}");
            return ExitCode::from(failure::Code::Error as u8);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let (code, message) = failure::report(&err);
            if let Some(message) = message {
                twtrace::say!("{message}");
            }
            // exec: an error or bad usage of twtrace's own is 125; the environment's codes
            // (4 to 7, found before the command starts) keep their meaning.
            let own_failure = !err.is::<failure::ExitWith>()
                && (code == failure::Code::Error as u8 || code == failure::Code::Usage as u8);
            ExitCode::from(if exec && own_failure {
                failure::exec_code::FAILED
            } else {
                code
            })
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Watch(args) => views::watch::run(args).await,
        Command::Report(args) => views::report::run(args).await,
        Command::Top(args) => views::top::run(args).await,
        Command::Serve(args) => views::serve::run(args).await,
        Command::Exec(args) => views::exec::run(args).await,
        Command::Doctor(args) => views::doctor::run(args).await,
    }
}
