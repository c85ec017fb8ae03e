//! `cargo +stable xtask fuzz [--seconds N] [TARGET...]`: runs the cargo-fuzz targets of `fuzz/`
//! for a bounded time each, and tells per target how many inputs ran, how the corpus grew, and
//! whether anything crashed (a crash fails the command and names the input that caused it).
//!
//! cargo-fuzz needs a nightly toolchain; the pinned one uses LLVM 22 like Rust 1.98 (newer ones
//! have LLVM 23, which bpf-linker cannot read: the fuzz build also builds the kernel programs).
//! What is missing is installed first, one line per step, as `setup` does.
//!
//! libFuzzer adds what it finds to the corpus directory it is given. The seeds committed in
//! `fuzz/corpus/<target>` are copied to `target/fuzz-corpus/<target>` and the run grows that
//! copy, so the tree stays clean and later runs start from what earlier ones found.

use std::{
    fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::Instant,
};

use crate::{
    root,
    setup::{self, cargo_bin_dir, output, step, which},
    status, TOOLCHAIN,
};

/// The nightly cargo-fuzz builds with: its LLVM (22) must match bpf-linker's.
pub const NIGHTLY: &str = "nightly-2026-07-05";
/// The cargo-fuzz installed when it is missing.
const CARGO_FUZZ: &str = "0.13.2";
/// The `[[bin]]`s of `fuzz/Cargo.toml`, in the order they run.
pub const TARGETS: [&str; 4] = ["decode", "filter", "api_query", "lifecycle"];
const DEFAULT_SECONDS: u64 = 30;
/// libFuzzer's limits besides the run time: memory, and one input's time (a hang is a finding).
const RSS_LIMIT_MB: u32 = 2048;
const INPUT_TIMEOUT_S: u32 = 10;

#[derive(Debug, PartialEq, Eq)]
struct Options {
    seconds: u64,
    targets: Vec<String>,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut seconds = DEFAULT_SECONDS;
    let mut targets: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let value = if a == "--seconds" {
            Some(
                it.next()
                    .ok_or("--seconds needs a number of seconds")?
                    .as_str(),
            )
        } else {
            a.strip_prefix("--seconds=")
        };
        if let Some(v) = value {
            seconds = match v.parse::<u64>() {
                Ok(n) if n > 0 && v.bytes().all(|b| b.is_ascii_digit()) => n,
                _ => return Err(format!("--seconds: '{v}' is not a whole number of seconds")),
            };
        } else if a.starts_with('-') {
            return Err(format!(
                "fuzz: unknown option '{a}' (usage: fuzz [--seconds N] [TARGET...])"
            ));
        } else if !TARGETS.contains(&a.as_str()) {
            return Err(format!(
                "fuzz: no target '{a}' (targets: {})",
                TARGETS.join(", ")
            ));
        } else if !targets.contains(a) {
            targets.push(a.clone());
        }
    }
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    Ok(Options { seconds, targets })
}

/// The nightly toolchain and cargo-fuzz, installed when missing (after what `build` needs: the
/// fuzz targets link the twtrace library, whose build script builds the kernel programs).
fn ensure() -> Result<(), String> {
    setup::ensure(setup::Need::Build)?;
    let installed = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !installed
        .lines()
        .any(|l| l.starts_with(&format!("{NIGHTLY}-")))
    {
        step(&format!(
            "installing Rust {NIGHTLY} (rustup) for cargo fuzz"
        ));
        status(Command::new("rustup").args([
            "toolchain",
            "install",
            NIGHTLY,
            "--profile",
            "minimal",
        ]))?;
    }
    let have_fuzz = which("cargo-fuzz")
        .or_else(|| {
            let p = cargo_bin_dir().join("cargo-fuzz");
            p.exists().then_some(p)
        })
        .is_some_and(|p| output(Command::new(p).arg("--version")).is_some());
    if !have_fuzz {
        step(&format!(
            "installing cargo-fuzz {CARGO_FUZZ} (cargo install, about a minute)"
        ));
        let mut cmd = Command::new("cargo");
        cmd.arg(format!("+{TOOLCHAIN}")).args([
            "install",
            "--locked",
            "--force",
            &format!("cargo-fuzz@{CARGO_FUZZ}"),
        ]);
        crate::clean_env(&mut cmd);
        cmd.env_remove("CARGO_TARGET_DIR");
        status(&mut cmd)?;
    }
    Ok(())
}

fn files_in(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    Ok(files)
}

/// Copies the seeds of `target` into the corpus the run grows; returns that directory.
fn corpus(target: &str) -> Result<PathBuf, String> {
    let seeds = root().join("fuzz").join("corpus").join(target);
    let dir = root().join("target").join("fuzz-corpus").join(target);
    fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for seed in files_in(&seeds)? {
        let name = seed.file_name().expect("a file has a name");
        fs::copy(&seed, dir.join(name))
            .map_err(|e| format!("cannot copy {}: {e}", seed.display()))?;
    }
    Ok(dir)
}

/// What one run showed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Outcome {
    /// From libFuzzer's final `Done N runs in S second(s)`.
    done: Option<(u64, u64)>,
    /// The last `#N` status line: how far a run that did not finish got.
    last_runs: u64,
    /// `Test unit written to PATH`: a crash, a timeout or an out-of-memory input.
    artifact: Option<String>,
    /// The panic message (its location line, then the message).
    panic: Vec<String>,
    /// libFuzzer started: a failure before that is a build failure.
    started: bool,
    expect_panic_message: bool,
}

impl Outcome {
    /// Reads one line of output; returns whether it is worth showing (libFuzzer's NEW and
    /// REDUCE lines are not: they come by the thousand).
    fn add_line(&mut self, line: &str) -> bool {
        if self.expect_panic_message {
            self.expect_panic_message = false;
            self.panic.push(line.trim().to_owned());
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut parts = rest.split_whitespace();
            if let Some(Ok(n)) = parts.next().map(str::parse::<u64>) {
                self.last_runs = n;
                return !matches!(parts.next(), Some("NEW" | "REDUCE"));
            }
        }
        if line.trim_start().starts_with("NEW_FUNC[") {
            return false;
        }
        if line.starts_with("INFO: Seed:") || line.starts_with("INFO: Running with") {
            self.started = true;
        }
        if let Some(rest) = line.strip_prefix("Done ") {
            // Done 1234 runs in 61 second(s)
            let w: Vec<&str> = rest.split_whitespace().collect();
            if let [n, "runs", "in", s, ..] = w[..] {
                if let (Ok(n), Ok(s)) = (n.parse(), s.parse()) {
                    self.done = Some((n, s));
                }
            }
        }
        if let Some((_, path)) = line.split_once("Test unit written to ") {
            self.artifact = Some(path.trim().to_owned());
        }
        if line.contains("panicked at ") && self.panic.is_empty() {
            self.panic
                .push(line.trim().trim_end_matches(':').to_owned());
            self.expect_panic_message = true;
        }
        true
    }
}

/// Sends each line of `from` to `tx`, tagged as stdout (false) or stderr (true).
fn forward<R: Read + Send + 'static>(
    from: R,
    stderr: bool,
    tx: mpsc::Sender<(bool, String)>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(from).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            if tx.send((stderr, line)).is_err() {
                break;
            }
        }
    })
}

struct Report {
    target: String,
    outcome: Outcome,
    corpus_before: usize,
    corpus_after: usize,
    wall_s: f64,
}

impl Report {
    fn runs_line(&self) -> String {
        match self.outcome.done {
            Some((n, s)) => format!("{n} runs in {s} s ({}/s)", n / s.max(1)),
            None => format!("{}+ runs", self.outcome.last_runs),
        }
    }

    fn result(&self) -> String {
        match (&self.outcome.artifact, self.outcome.panic.first()) {
            (Some(a), Some(p)) => format!("CRASH: {a} ({p})"),
            (Some(a), None) => format!("CRASH: {a}"),
            (None, _) => "no crash".to_owned(),
        }
    }
}

fn run_target(target: &str, seconds: u64) -> Result<Report, String> {
    let dir = corpus(target)?;
    let corpus_before = files_in(&dir)?.len();
    let start = Instant::now();
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{NIGHTLY}"))
        .args(["fuzz", "run", target])
        .arg(&dir)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    crate::clean_env(&mut cmd);
    println!(
        "xtask fuzz: {target} for {seconds} s (corpus {})",
        dir.display()
    );
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
    let (tx, rx) = mpsc::channel();
    let out = forward(child.stdout.take().expect("piped"), false, tx.clone());
    let err = forward(child.stderr.take().expect("piped"), true, tx);
    let mut outcome = Outcome::default();
    for (is_err, line) in rx {
        if outcome.add_line(&line) {
            if is_err {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
    }
    let _ = out.join();
    let _ = err.join();
    let s = child.wait().map_err(|e| e.to_string())?;
    if !s.success() && outcome.artifact.is_none() {
        return Err(if outcome.started {
            format!("cargo fuzz run {target} failed ({s}) and named no input")
        } else {
            format!("cargo fuzz could not build {target} ({s})")
        });
    }
    let report = Report {
        target: target.to_owned(),
        corpus_after: files_in(&dir)?.len(),
        corpus_before,
        outcome,
        wall_s: start.elapsed().as_secs_f64(),
    };
    println!(
        "xtask fuzz: {target}: {}, corpus {} -> {} inputs, {} ({:.0} s in all)",
        report.runs_line(),
        report.corpus_before,
        report.corpus_after,
        report.result(),
        report.wall_s
    );
    Ok(report)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let opts = parse_args(args)?;
    ensure()?;
    let start = Instant::now();
    let mut reports = Vec::new();
    for t in &opts.targets {
        reports.push(run_target(t, opts.seconds)?);
    }
    println!(
        "xtask fuzz: {} target(s) in {:.0} s",
        reports.len(),
        start.elapsed().as_secs_f64()
    );
    for r in &reports {
        println!(
            "  {:<10} {:<36} corpus {:>5} -> {:<5} {}",
            r.target,
            r.runs_line(),
            r.corpus_before,
            r.corpus_after,
            r.result()
        );
    }
    let crashed: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            r.outcome.artifact.as_ref().map(|a| {
                let msg = r.outcome.panic.join(": ");
                format!(
                    "{}: {a}{}\n  reproduce: cargo +{NIGHTLY} fuzz run {} {a}",
                    r.target,
                    if msg.is_empty() {
                        String::new()
                    } else {
                        format!("\n  {msg}")
                    },
                    r.target
                )
            })
        })
        .collect();
    if crashed.is_empty() {
        Ok(())
    } else {
        Err(format!("fuzzing found crashes:\n{}", crashed.join("\n")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strings as args;

    #[test]
    fn options_default_to_every_target_for_30_s() {
        let all: Vec<String> = TARGETS.iter().map(|t| t.to_string()).collect();
        assert_eq!(
            parse_args(&[]),
            Ok(Options {
                seconds: 30,
                targets: all.clone()
            })
        );
        assert_eq!(
            parse_args(&args(&["--seconds", "60", "filter", "decode", "filter"])),
            Ok(Options {
                seconds: 60,
                targets: args(&["filter", "decode"])
            })
        );
        assert_eq!(parse_args(&args(&["--seconds=5"])).unwrap().seconds, 5);
        assert!(parse_args(&args(&["--seconds", "0"])).is_err());
        assert!(parse_args(&args(&["--seconds", "+5"])).is_err());
        assert!(parse_args(&args(&["--seconds"])).is_err());
        assert!(parse_args(&args(&["--jobs", "2"]))
            .unwrap_err()
            .contains("--jobs"));
        assert!(parse_args(&args(&["decoder"]))
            .unwrap_err()
            .contains("decode, filter"));
    }

    #[test]
    fn reads_libfuzzer_output() {
        let mut o = Outcome::default();
        assert!(o.add_line("INFO: Seed: 1234"));
        assert!(!o.add_line("#512\tNEW    cov: 100 ft: 200 corp: 12/300b exec/s: 0 rss: 40Mb"));
        assert!(!o.add_line("\tNEW_FUNC[1/1]: 0x55872d779650 in alloc::fmt::format"));
        assert!(o.add_line("#1024\tpulse  cov: 100 ft: 200 corp: 12/300b exec/s: 512 rss: 40Mb"));
        assert!(o.add_line("Done 1843202 runs in 61 second(s)"));
        assert_eq!(o.done, Some((1_843_202, 61)));
        assert_eq!(o.last_runs, 1024);
        assert!(o.started);
        assert_eq!(o.artifact, None);

        let mut o = Outcome::default();
        o.add_line("thread '<unnamed>' panicked at fuzz_targets/lifecycle.rs:12:5:");
        o.add_line("attempt to subtract with overflow");
        o.add_line("==4242== ERROR: libFuzzer: deadly signal");
        o.add_line(
            "artifact_prefix='/w/fuzz/artifacts/lifecycle/'; Test unit written to \
             /w/fuzz/artifacts/lifecycle/crash-0a1b",
        );
        assert_eq!(
            o.artifact.as_deref(),
            Some("/w/fuzz/artifacts/lifecycle/crash-0a1b")
        );
        assert_eq!(
            o.panic,
            vec![
                "thread '<unnamed>' panicked at fuzz_targets/lifecycle.rs:12:5".to_owned(),
                "attempt to subtract with overflow".to_owned()
            ]
        );
        assert_eq!(o.done, None);
    }

    #[test]
    fn every_target_has_a_bin_and_seeds() {
        let manifest = fs::read_to_string(root().join("fuzz/Cargo.toml")).unwrap();
        for t in TARGETS {
            assert!(
                manifest.contains(&format!("name = \"{t}\"")),
                "fuzz/Cargo.toml has no [[bin]] {t}"
            );
            let seeds = files_in(&root().join("fuzz/corpus").join(t)).unwrap();
            assert!(!seeds.is_empty(), "no seeds for {t}");
        }
    }
}
