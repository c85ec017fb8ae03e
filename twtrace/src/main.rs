//! twtrace: where a Linux host's TCP TIME_WAIT sockets come from.
//!
//! Data flows one way: kernel programs -> ring buffer (`source`) -> `decode` -> `lifecycle`
//! -> views. See ARCHITECTURE.md.

mod btf;
mod cli;
mod clock;
mod decode;
mod failure;
mod filter;
mod lifecycle;
mod preflight;
mod probes;
mod session;
mod source;
mod views;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
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
            eprintln!("twtrace: {message}");
            ExitCode::from(code as u8)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Watch(args) => views::watch::run(args).await,
    }
}
