//! `cargo +stable xtask vm-test`: the integration tests on Debian's own kernels, each booted
//! under qemu with the release build of twtrace inside, and a matrix kernel x test.
//!
//! Nothing is loaded into this machine's kernel: every program twtrace loads is loaded in a
//! guest. Everything is kept under target/vm-test/: apt's lists and the kernel packages
//! (`kernels`), the initramfs images (`initramfs`), the serial logs of each lane (`logs/`) and
//! the matrix of the last run (`matrix.md`, also what `--update-readme` puts in the README).
//!
//! One module per concern: `lanes` (the kernels and lanes, in one place), `kernels` (download,
//! cache, modules), `suite` (the build and the tests that run in the guest), `initramfs` (the
//! guest's files), `qemu` (boot, console, hang detection), `matrix` (results, rendering).

mod initramfs;
mod kernels;
mod lanes;
mod matrix;
mod qemu;
mod suite;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use self::{
    kernels::{create_dir, Kernel},
    lanes::{Lane, Lockdown},
    matrix::{classify, minutes, Column, Line, Matrix, Status},
    qemu::Accel,
    suite::{Plan, Selection},
};
use crate::{root, setup};

const USAGE: &str = "\
usage: cargo +stable xtask vm-test [--kernel 6.1,6.12,5.10,sid] [--lockdown integrity|confidentiality]
                                   [--only PATTERN]... [--skip PATTERN]... [--accel auto|kvm|tcg]
                                   [--timeout MINUTES] [--update-readme]

  --kernel LIST     these kernel series (default: the whole matrix: 6.1, 6.12, 5.10,
                    6.1 with lockdown=integrity and =confidentiality, and unstable's newest);
                    an entry may name a lane with its mode: 6.1+confidentiality
  --lockdown MODE   boot with lockdown=MODE (with --kernel: each of them; alone: the
                    matrix's lanes with that mode)
  --only PATTERN    only the tests whose executable::name contains PATTERN (repeatable)
  --skip PATTERN    not the tests whose executable::name contains PATTERN (repeatable;
                    the matrix lists them as left out)
  --accel           auto: KVM when a short probe boots under it, else TCG (default)
  --timeout MIN     per lane, from qemu's start (default 60)
  --update-readme   put the matrix into README.md's \"Tested kernels\" block

Needs no root (but `xtask setup`, which installs qemu, busybox and the guest's tools, does).
Writes target/vm-test/matrix.md and the serial logs in target/vm-test/logs/. Exits non-zero
when any test fails in any lane.";

const DEFAULT_TIMEOUT_MIN: u64 = 60;

#[derive(Debug, Default)]
struct Options {
    kernels: Vec<String>,
    lockdown: Option<Lockdown>,
    selection: Selection,
    accel: Option<Accel>,
    timeout: Duration,
    update_readme: bool,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        timeout: Duration::from_secs(DEFAULT_TIMEOUT_MIN * 60),
        ..Options::default()
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
            _ => (a.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next().cloned())
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag {
            "--kernel" => o.kernels.extend(
                value()?
                    .split(',')
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned),
            ),
            "--lockdown" => o.lockdown = Some(Lockdown::parse(&value()?)?),
            "--only" => o.selection.only.push(value()?),
            "--skip" => o.selection.skip.push(value()?),
            "--accel" => o.accel = Accel::parse(&value()?)?,
            "--timeout" => {
                let v = value()?;
                let min: u64 = v
                    .parse()
                    .ok()
                    .filter(|m| *m > 0)
                    .ok_or_else(|| format!("--timeout takes minutes, not '{v}'"))?;
                o.timeout = Duration::from_secs(min * 60);
            }
            "--update-readme" => o.update_readme = true,
            "-h" | "--help" => return Err(USAGE.to_owned()),
            _ => return Err(format!("unknown argument '{a}'\n{USAGE}")),
        }
    }
    Ok(o)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let opts = parse_args(args)?;
    let lanes = lanes::select(&opts.kernels, opts.lockdown)?;
    setup::ensure(setup::Need::VmTest)?;
    let work = crate::target_dir().join("vm-test");
    for d in ["logs", "initramfs"] {
        create_dir(&work.join(d))?;
    }

    let build = suite::build(&work.join("shipped"))?;
    let plan = suite::plan(&build.tests, &opts.selection);
    if plan.runs.is_empty() {
        return Err(format!(
            "no test to run (--only {})",
            opts.selection.only.join(" --only ")
        ));
    }

    // Each series once, whatever the number of its lanes.
    let mut kernels: BTreeMap<&str, Result<Kernel, String>> = BTreeMap::new();
    for lane in &lanes {
        kernels
            .entry(lane.series.name)
            .or_insert_with(|| kernels::fetch(lane.series, &work));
    }
    let base = initramfs::base(&build, &plan, &work)?;
    let mut initrds: BTreeMap<&str, PathBuf> = BTreeMap::new();
    for (series, kernel) in &kernels {
        if let Ok(k) = kernel {
            let path = work.join("initramfs").join(format!("{series}.cpio"));
            let mut image = base.clone();
            image.extend(initramfs::kernel_part(k)?);
            fs::write(&path, image).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            initrds.insert(series, path);
        }
    }
    let Some(first) = kernels.values().find_map(|k| k.as_ref().ok()) else {
        let why: Vec<String> = kernels
            .iter()
            .filter_map(|(s, k)| k.as_ref().err().map(|e| format!("{s}: {e}")))
            .collect();
        return Err(format!("no kernel could be fetched: {}", why.join("; ")));
    };
    let (accel, why) = match opts.accel {
        Some(a) => (a, "--accel".to_owned()),
        None => {
            let probe = work.join("initramfs/probe.cpio");
            fs::write(&probe, initramfs::probe()?)
                .map_err(|e| format!("cannot write {}: {e}", probe.display()))?;
            qemu::probe(&first.vmlinuz, &probe)
        }
    };
    println!("vm-test: accelerator {} ({why})", accel.name());

    let rows = plan.rows();
    let mut columns = Vec::new();
    for lane in &lanes {
        let name = lane.to_string();
        let column = match &kernels[lane.series.name] {
            Err(e) => {
                println!("vm-test: {name}: not run: {e}");
                Column::unavailable(&name, &rows, e, lane.series.optional)
            }
            Ok(k) => run_lane(
                lane,
                k,
                &initrds[lane.series.name],
                accel,
                &plan,
                &work,
                &opts,
            )?,
        };
        columns.push(column);
    }

    let m = Matrix {
        tested: tested(&build),
        rows,
        columns,
        left: plan.left,
    };
    println!("\n{}", m.text());
    let md = m.markdown(&today());
    let md_path = work.join("matrix.md");
    kernels::write(&md_path, &md)?;
    println!(
        "vm-test: the matrix is in {}; serial logs in {}",
        md_path.display(),
        work.join("logs").display()
    );
    if opts.update_readme {
        let readme = root().join("README.md");
        let text =
            fs::read_to_string(&readme).map_err(|e| format!("cannot read README.md: {e}"))?;
        kernels::write(&readme, &matrix::replace_block(&text, &md)?)?;
        println!("vm-test: README.md's \"Tested kernels\" now shows this run");
    }
    if m.failed() {
        Err("some tests failed in some lanes (the matrix above)".into())
    } else {
        Ok(())
    }
}

fn run_lane(
    lane: &Lane,
    kernel: &Kernel,
    initrd: &Path,
    accel: Accel,
    plan: &Plan,
    work: &Path,
    opts: &Options,
) -> Result<Column, String> {
    let name = lane.to_string();
    println!(
        "vm-test: {name}: booting {} {} ({})",
        kernel.package,
        kernel.version,
        accel.name()
    );
    let logs = work.join("logs");
    let spec = qemu::Spec {
        kernel: &kernel.vmlinuz,
        initrd,
        lockdown: lane.lockdown,
        accel,
        console_log: logs.join(format!("{name}.console.log")),
        tests_log: logs.join(format!("{name}.tests.log")),
        limit: opts.timeout,
        silence: suite::EXECUTABLE_LIMIT + Duration::from_secs(120),
    };
    let mut progress = Progress::default();
    let boot = qemu::boot(&spec, |line| progress.line(&name, line))?;
    let mut column = Column::from_boot(
        &name,
        &format!("{} {}", kernel.package, kernel.version),
        lane.series.optional,
        plan,
        &boot,
    );
    column.how = format!("({}, {})", accel.name(), minutes(boot.wall));
    println!("vm-test: {name}: done in {}", minutes(boot.wall));
    Ok(column)
}

/// `twtrace 0.1.0 (git ..., ebpf ...)`, the static binary of `twtrace-...tar.gz`: what the
/// guests ran (`--version` runs on any host: it loads nothing).
fn tested(build: &suite::Build) -> String {
    let version = std::process::Command::new(&build.twtrace)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "twtrace".into());
    let tarball = build
        .tarball
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("`{version}`, the static binary of `{tarball}`")
}

/// One line per executable as it ends, and each failure as it happens.
#[derive(Default)]
struct Progress {
    exe: String,
    passed: usize,
    failed: usize,
}

impl Progress {
    fn line(&mut self, lane: &str, line: &str) {
        match classify(line) {
            Line::Start { release } => println!("vm-test: {lane}: {release} is up"),
            Line::Info(i) if i.contains("not loaded") => println!("vm-test: {lane}: {i}"),
            Line::Begin { exe } => {
                *self = Progress {
                    exe: exe.to_owned(),
                    ..Progress::default()
                }
            }
            Line::Test { name, status } => match status {
                Status::Ok => self.passed += 1,
                Status::Failed => {
                    self.failed += 1;
                    println!("vm-test: {lane}: {}::{name} FAILED", self.exe);
                }
                Status::Ignored => {}
            },
            Line::End { exe, rc, uptime: _ } => println!(
                "vm-test: {lane}: {exe}: {} passed, {} failed{}",
                self.passed,
                self.failed,
                match rc {
                    Some(0) | None => String::new(),
                    Some(rc) => format!(" (exit code {rc})"),
                }
            ),
            _ => {}
        }
    }
}

/// Today's date (UTC), for the matrix's title.
fn today() -> String {
    let days = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    date(days as i64)
}

/// The date `days` after 1970-01-01 (Howard Hinnant's civil_from_days; std has no calendar).
fn date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strings as args;

    #[test]
    fn options() {
        let o = parse_args(&args(&[
            "--kernel",
            "6.1,6.12",
            "--lockdown=integrity",
            "--only",
            "watch::",
            "--accel",
            "tcg",
            "--timeout",
            "30",
            "--update-readme",
        ]))
        .unwrap();
        assert_eq!(o.kernels, ["6.1", "6.12"]);
        assert_eq!(o.lockdown, Some(Lockdown::Integrity));
        assert!(o.update_readme);
        assert_eq!(o.selection.only, ["watch::"]);
        assert_eq!(o.accel, Some(Accel::Tcg));
        assert_eq!(o.timeout, Duration::from_secs(1800));
        assert_eq!(parse_args(&[]).unwrap().timeout, Duration::from_secs(3600));
        assert!(parse_args(&args(&["--timeout", "0"])).is_err());
        assert!(parse_args(&args(&["--kernel"]))
            .unwrap_err()
            .starts_with("--kernel needs a value"));
        assert!(parse_args(&args(&["--bogus"]))
            .unwrap_err()
            .starts_with("unknown argument '--bogus'"));
    }

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(19_782), "2024-02-29");
        assert_eq!(date(20_787), "2026-11-30");
    }
}
