//! Man pages and shell completions, generated from twtrace's clap definitions (clap_mangen,
//! clap_complete), never written by hand:
//!
//! * `man/twtrace.8` and one page per subcommand (`man/twtrace-watch.8`, ...): section 8,
//!   system administration, as twtrace runs as root and the package installs it in /usr/sbin;
//! * `completions/twtrace.bash`, `completions/_twtrace` (zsh), `completions/twtrace.fish`.
//!
//! `twt-docs DIR` writes them: `cargo +stable xtask docs` into deploy/ (the committed copies),
//! `cargo +stable xtask dist` into its staging tree. `tests/tests/dist_docs.rs` fails when the
//! committed copies differ from what the CLI generates now (a flag added without regenerating).

use clap::CommandFactory;
use clap_complete::Shell;
use twtrace::cli::Cli;

/// The manual section of every page.
pub const SECTION: &str = "8";

/// The completion scripts: shell, and the file name under `completions/`.
pub const COMPLETIONS: [(Shell, &str); 3] = [
    (Shell::Bash, "twtrace.bash"),
    (Shell::Zsh, "_twtrace"),
    (Shell::Fish, "twtrace.fish"),
];

/// The CLI as the docs describe it: with the plain crate version, since the `--version` line
/// names a commit, which would change every committed page at every commit.
fn command() -> clap::Command {
    Cli::command().version(env!("CARGO_PKG_VERSION"))
}

/// Every generated file: its path under the output directory (`man/...`, `completions/...`)
/// and its contents.
pub fn render() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    // Built once so that subcommands carry their full names (`twtrace-watch`); `help` is
    // clap's own and needs no page.
    let mut cmd = command().disable_help_subcommand(true);
    cmd.build();
    man_pages(&cmd, &mut out);
    for (shell, file) in COMPLETIONS {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut command(), "twtrace", &mut script);
        out.push((format!("completions/{file}"), script));
    }
    out
}

fn man_pages(cmd: &clap::Command, out: &mut Vec<(String, Vec<u8>)>) {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        man_pages(sub, out);
    }
    // The source names twtrace and its version on every page (clap_mangen would put the
    // subcommand's own, empty, version there).
    let man = clap_mangen::Man::new(cmd.clone())
        .section(SECTION)
        .source(format!("twtrace {}", env!("CARGO_PKG_VERSION")))
        .manual("twtrace");
    let mut page = Vec::new();
    man.render(&mut page).expect("rendering into memory");
    out.push((format!("man/{}", man.get_filename()), page));
}
