//! `cargo +stable xtask <command>`: set-up, build, run, test, fuzz, bench, soak, vm-test.
//!
//! xtask itself builds with whatever stable Rust the machine has and depends on nothing but std,
//! so that it runs on a fresh machine. It then installs what is missing, one line per step it
//! takes, and drives the pinned toolchain for everything else.

mod bench;
mod dist;
mod fuzz;
mod json;
mod procs;
mod setup;
mod soak;
mod vmtest;

use std::{
    env,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

/// Must match rust-toolchain.toml (checked by a unit test).
pub const TOOLCHAIN: &str = "1.98.0";

const USAGE: &str = "\
usage: cargo +stable xtask <command>

  setup                 install what is missing (toolchain, LLVM 22, bpf-linker, test tools,
                        qemu and the guests' tools)
  build [--release]     build twtrace
  run [--release] -- ARGS
                        build and run twtrace ARGS (as root, through sudo when needed)
  test [-- ARGS]        run every test: unit tests, then the integration tests that load the
                        real programs into this kernel, and the install tests of what dist
                        builds (needs root)
  dist                  what ships, in target/packages: a static binary, a tarball, a .deb and an
                        OCI image (see DEVELOPERS.md)
  docs                  regenerate the man pages and shell completions in deploy/ from the CLI
  fuzz [--seconds N] [TARGET...]
                        run the cargo-fuzz targets, N s each (default 30, all targets)
  bench [--quick]       twtrace's overhead next to the classic tools, A/B interleaved (root)
  soak [--minutes N] [--rate R]
                        a long run at steady churn: RSS, owner map and counts must stay right
  vm-test [--kernel 6.1,6.12,...] [--lockdown integrity|confidentiality] ...
                        the integration tests on Debian's kernels, each booted under qemu:
                        a matrix kernel x test (vm-test --help for every option)";

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::ensure(setup::Need::All),
        Some("build") => setup::ensure(setup::Need::Build).and_then(|_| build(release(&args))),
        Some("run") => run(&args[1..]),
        Some("test") => test(&args[1..]),
        Some("dist") => dist::run(&args[1..]),
        Some("docs") => setup::ensure(setup::Need::Build)
            .and_then(|_| dist::generate_docs(&root().join("deploy"), true)),
        Some("bench") => bench::run(&args[1..]),
        Some("fuzz") => fuzz::run(&args[1..]),
        Some("soak") => soak::run(&args[1..]),
        Some("vm-test") => vmtest::run(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn release(args: &[String]) -> bool {
    args.iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--release")
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// Where cargo builds: CARGO_TARGET_DIR (relative to the workspace) or target/.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(d) => root().join(d),
        None => root().join("target"),
    }
}

/// `cargo +TOOLCHAIN ...` in the workspace, free of what the outer `cargo +stable` set.
pub fn cargo(args: &[&str]) -> Command {
    let mut c = Command::new("cargo");
    c.arg(format!("+{TOOLCHAIN}"))
        .args(args)
        .current_dir(root());
    clean_env(&mut c);
    c
}

/// Removes what the outer `cargo +stable` set for its children, so that a child cargo picks
/// its own toolchain (the `+toolchain` given, or rust-toolchain.toml).
pub fn clean_env(cmd: &mut Command) {
    for var in [
        "RUSTUP_TOOLCHAIN",
        "CARGO",
        "RUSTC",
        "RUSTDOC",
        "RUSTC_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
}

pub fn status(cmd: &mut Command) -> Result<(), String> {
    let s = cmd
        .status()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if s.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed ({s})"))
    }
}

/// The release binaries: twtrace, and the tests' `twt-churn` and `twt-loadgen`; their directory.
pub fn build_release_bins() -> Result<PathBuf, String> {
    status(&mut cargo(&[
        "build",
        "--release",
        "--package",
        "twtrace",
        "--package",
        "twtrace-tests",
        "--bins",
    ]))?;
    Ok(target_dir().join("release"))
}

fn build(release: bool) -> Result<(), String> {
    let mut args = vec!["build", "--package", "twtrace"];
    if release {
        args.push("--release");
    }
    status(&mut cargo(&args))
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn run(args: &[String]) -> Result<(), String> {
    setup::ensure(setup::Need::Run)?;
    let rel = release(args);
    build(rel)?;
    let bin = root()
        .join("target")
        .join(if rel { "release" } else { "debug" })
        .join("twtrace");
    let rest: Vec<&String> = match args.iter().position(|a| a == "--") {
        Some(i) => args[i + 1..].iter().collect(),
        None => args.iter().filter(|a| *a != "--release").collect(),
    };
    let mut cmd = if is_root() || setup::which("sudo").is_none() {
        Command::new(&bin)
    } else {
        eprintln!("xtask: twtrace loads eBPF programs: running it through sudo");
        let mut c = Command::new("sudo");
        c.arg(&bin);
        c
    };
    cmd.args(rest);
    let s = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if s.success() {
        Ok(())
    } else {
        Err(format!("twtrace exited with {s}"))
    }
}

/// Totals of every `test result:` line cargo printed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut it = part.split_whitespace().rev();
            let (Some(word), Some(num)) = (it.next(), it.next()) else {
                continue;
            };
            let Ok(n) = num.parse::<u64>() else { continue };
            match word {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

fn test(args: &[String]) -> Result<(), String> {
    setup::ensure(setup::Need::Test)?;
    if !is_root() {
        return Err(
            "the integration tests load eBPF programs and create network namespaces: run \
             `sudo -E cargo +stable xtask test`"
                .into(),
        );
    }
    // The binaries the integration tests drive, from the same build as the tests.
    status(&mut cargo(&[
        "build",
        "--package",
        "twtrace",
        "--package",
        "twtrace-tests",
    ]))?;
    // What ships, for the install tests (the .deb in a clean Debian root, the image in podman).
    let dist = dist::build()?;
    let extra: Vec<&str> = match args.iter().position(|a| a == "--") {
        Some(i) => args[i + 1..].iter().map(String::as_str).collect(),
        None => Vec::new(),
    };
    let mut cmd = cargo(&["test", "--no-fail-fast"]);
    if !extra.is_empty() {
        cmd.arg("--").args(&extra);
    }
    cmd.env("TWTRACE_BIN", root().join("target/debug/twtrace"));
    cmd.env("TWTRACE_DIST", &dist.dir);
    cmd.env("TWTRACE_DEBIAN_ROOT", setup::debian_root());
    cmd.stdout(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run cargo test: {e}"))?;
    let mut tally = Tally::default();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.map_err(|e| e.to_string())?;
        println!("{line}");
        tally.add_line(&line);
    }
    let s = child.wait().map_err(|e| e.to_string())?;
    let ran = tally.passed + tally.failed;
    println!(
        "xtask test: {ran} tests ran: {} passed, {} failed, {} ignored",
        tally.passed, tally.failed, tally.ignored
    );
    if s.success() && tally.failed == 0 && ran > 0 {
        Ok(())
    } else {
        Err(format!("tests failed ({s})"))
    }
}

/// `&str`s as the `String`s a command's arguments come as (for tests).
#[cfg(test)]
pub fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toolchain_matches_the_toolchain_file() {
        let file = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
        assert!(
            file.contains(&format!("channel = \"{TOOLCHAIN}\"")),
            "rust-toolchain.toml and xtask disagree"
        );
    }

    #[test]
    fn tally_sums_result_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 5 tests");
        assert_eq!(
            t,
            Tally {
                passed: 15,
                failed: 2,
                ignored: 1
            }
        );
    }

    #[test]
    fn release_flag_only_before_the_separator() {
        assert!(release(&strings(&["run", "--release", "--", "watch"])));
        assert!(!release(&strings(&["run", "--", "watch", "--release"])));
    }
}
