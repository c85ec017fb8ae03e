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
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("twtrace: cannot start the async runtime: {e}");
            return ExitCode::from(failure::Code::Error as u8);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let (code, message) = failure::report(&err);
            if let Some(message) = message {
                eprintln!("twtrace: {message}");
            }
            ExitCode::from(code)
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
