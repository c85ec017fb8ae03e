//! `cargo +stable xtask bench`: what twtrace costs a busy host, next to the classic tools,
//! measured in one session.
//!
//! For each scenario it runs the same load three times per repeat, interleaved: A (the load
//! alone), B (the load with one tracer attached) and the cost run C (traced, half as long, with
//! `kernel.bpf_stats_enabled=1`, which times every program run and so is kept out of the A/B
//! ratios), each run in a fresh network namespace so that the TIME_WAIT of one run never slows
//! the next. From them, per repeat, the tracer's own CPU per connection (its programs' run time
//! over the hooks' empty programs, plus its userspace CPU) over an untraced connection's CPU
//! (busy time from /proc/stat in the A run), with bootstrap intervals over the repeats;
//! `--until-ci` adds repeats until those intervals are narrow enough. The load is `twt-loadgen` (tests/src/bin), client
//! closes first: one TIME_WAIT per connection. Tracers run in the host namespace (the kernel
//! programs see every namespace).
//!
//! Measured per run: connections/s; for twtrace its own `--stats-json` (kernel counters, each
//! program's run time and run count in the cost run, recursion misses, events received), its CPU time from /proc/PID/stat (at attach, just before SIGINT, and as a zombie
//! right after it exits, before it is reaped: the full total) and its peak RSS (VmHWM, read
//! while it runs: it is gone from a zombie); for the peers their programs' run time through
//! bpftool (found by the program ids in the tracer's own /proc/PID/fdinfo) and the losses they
//! print; for every run the namespace's TcpExt counters and the host's IRQ-work interrupts.
//!
//! It prints figures and never asserts: a benchmark reports.
//!
//! One module per concern: `scenario` (what is compared), `load` (one run) and `tracer` (a tracer
//! in it), `stats` (runs to a summary) and `bootstrap` (its intervals), `render` (the table and
//! the JSON); under them `guard`
//! (set-up undone on every exit) and `kernel` (what /proc says); bounded waits (`crate::procs`)
//! and JSON (`crate::json`) are shared with the other commands.

mod bootstrap;
mod guard;
mod kernel;
mod load;
mod render;
mod scenario;
mod stats;
mod tracer;

use std::{
    env, fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use self::{
    guard::{set_bpf_stats, Restore},
    load::Run,
    render::{f0, run_json, summary_json, table},
    scenario::Kind,
    stats::{summarize, Floor, Summary},
};
use crate::{
    json::{num, obj, opt, Json},
    procs::run_for,
    setup,
};

const USAGE: &str = "\
usage: cargo +stable xtask bench [--repeats N] [--seconds S] [--quick] [--threads N]
                                 [--only watch,report,serve,refused,hooks,tcpstates,bpftrace,floor]
                                 [--no-bpf-stats] [--until-ci W] [--max-minutes M]

  --repeats N   repeats per scenario: an interleaved A/B pair and a cost run (default 4)
  --seconds S   load per A/B run, seconds (default 6, at most 120; cost runs half as long)
  --quick       smoke run: 2 repeats of 3 s
  --threads N   loadgen client threads and server threads, each (default 2)
  --only LIST   only these scenarios (comma-separated; hooks, the floor of the own-CPU
                figures, is added when a twtrace scenario is chosen)
  --no-bpf-stats  no cost runs with kernel.bpf_stats_enabled=1 (no per-program run time, no
                own-CPU share); the A/B pairs always run with it off: it slows every BPF
                program run
  --until-ci W  more repeats until the 95 % interval of each own-CPU share is at most W wide
                (e.g. 0.01: one percentage point), or until --max-minutes
  --max-minutes M  time for the whole bench once --until-ci adds repeats (default 30)

Runs as root. Writes target/bench/bench-<unix time>.json and target/bench/latest.json.";

/// The targets from the issue, printed next to the figures.
const TARGET_RATIO: f64 = 0.97;
const TARGET_STATE_NS: f64 = 300.0;
const TARGET_TIMER_NS: f64 = 40.0;
const TARGET_CPU_MS_PER_1K: f64 = 20.0;
const TARGET_RSS_MB: f64 = 50.0;
/// twtrace's own CPU per connection, as a share of an untraced connection's (serve's target).
const TARGET_SHARE: f64 = 0.01;

/// Per-namespace TIME_WAIT limit for the runs: above the connections of any run, so that every
/// connection leaves exactly one TIME_WAIT (the default, half the established hash, would
/// overflow within seconds at this rate). The loadgen is capped at the same count.
const MAX_TW: u64 = 5_000_000;

struct Opts {
    repeats: usize,
    seconds: u32,
    threads: usize,
    only: Option<Vec<String>>,
    quick: bool,
    bpf_stats: bool,
    until_ci: Option<f64>,
    max_minutes: u64,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        repeats: 4,
        seconds: 6,
        threads: 2,
        only: None,
        quick: false,
        bpf_stats: true,
        until_ci: None,
        max_minutes: 30,
    };
    let (mut repeats, mut seconds) = (None, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        let num = |name: &str, v: String, hi: u64| -> Result<u64, String> {
            match v.parse::<u64>() {
                Ok(n) if (1..=hi).contains(&n) => Ok(n),
                _ => Err(format!("{name}: '{v}' is not a number from 1 to {hi}")),
            }
        };
        match a.as_str() {
            "--repeats" => repeats = Some(num("--repeats", val()?, 50)? as usize),
            "--seconds" => seconds = Some(num("--seconds", val()?, 120)? as u32),
            "--threads" => o.threads = num("--threads", val()?, 16)? as usize,
            "--quick" => o.quick = true,
            "--no-bpf-stats" => o.bpf_stats = false,
            "--until-ci" => {
                let v = val()?;
                match v.parse::<f64>() {
                    Ok(w) if w > 0.0 && w < 1.0 => o.until_ci = Some(w),
                    _ => return Err(format!("--until-ci: '{v}' is not a width between 0 and 1")),
                }
            }
            "--max-minutes" => o.max_minutes = num("--max-minutes", val()?, 600)?,
            "--only" => {
                let list: Vec<String> = val()?.split(',').map(|s| s.trim().to_owned()).collect();
                for s in &list {
                    if Kind::ALL.iter().all(|k| k.key() != s) {
                        return Err(format!("--only: unknown scenario '{s}'\n{USAGE}"));
                    }
                }
                o.only = Some(list);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("bench: unknown argument {other}\n{USAGE}")),
        }
    }
    if o.quick {
        o.repeats = 2;
        o.seconds = 3;
    }
    o.repeats = repeats.unwrap_or(o.repeats);
    o.seconds = seconds.unwrap_or(o.seconds);
    if o.until_ci.is_some() && !o.bpf_stats {
        return Err("--until-ci needs the cost runs: not with --no-bpf-stats".into());
    }
    Ok(o)
}

/// What every run needs: the binaries, the state directory (shared with the guard process), the
/// load's settings and the count of runs so far.
struct Ctx {
    twtrace: PathBuf,
    loadgen: PathBuf,
    tcpstates: Option<PathBuf>,
    bpftrace: Option<PathBuf>,
    state_dir: PathBuf,
    clk_tck: f64,
    seconds: u32,
    threads: usize,
    runs: usize,
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            l.split_whitespace().nth(2).map(|e| e == "0")
        })
        .unwrap_or(false)
}

/// A tool that answers `--help` (or `--version`), or None with the reason printed.
fn peer(name: &str, probe: &str) -> Option<PathBuf> {
    let found = setup::which(name).or_else(|| {
        ["/usr/sbin", "/usr/share/bcc/tools", "/usr/lib/bcc/tools"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
    });
    let Some(path) = found else {
        println!("bench: {name}: not installed, skipped");
        return None;
    };
    match run_for(Command::new(&path).arg(probe), Duration::from_secs(10)) {
        Ok(_) => Some(path),
        Err(e) => {
            println!(
                "bench: {name}: `{} {probe}` fails, skipped ({e})",
                path.display()
            );
            None
        }
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let o = parse(args)?;
    let began = Instant::now();
    setup::ensure(setup::Need::Test)?;
    if !is_root() {
        return Err(
            "the benchmark loads eBPF programs, creates network namespaces and sets \
             kernel.bpf_stats_enabled: run `sudo -E cargo +stable xtask bench`"
                .into(),
        );
    }
    crate::status(&mut crate::cargo(&[
        "build",
        "--release",
        "--package",
        "twtrace",
        "--bin",
        "twtrace",
        "--package",
        "twtrace-tests",
        "--bin",
        "twt-loadgen",
    ]))?;
    let target = crate::target_dir();
    let release = target.join("release");
    let twtrace = release.join("twtrace");
    // The own-CPU shares are measured over the hooks' floor: run it whenever twtrace runs.
    let floor_needed = o.bpf_stats
        && o.only.as_ref().is_none_or_compat(|l| {
            l.iter()
                .any(|s| Kind::ALL.iter().any(|k| k.key() == s && k.runs_twtrace()))
        });
    let wanted = |k: Kind| {
        (k == Kind::Hooks && floor_needed)
            || o.only
                .as_ref()
                .is_none_or_compat(|l| l.iter().any(|s| s == k.key()))
    };
    let mut skipped = Vec::new();
    let serve_ok = run_for(
        Command::new(&twtrace).args(["serve", "--help"]),
        Duration::from_secs(10),
    )
    .is_ok();
    let tcpstates = if wanted(Kind::Tcpstates) {
        peer("tcpstates", "--help")
    } else {
        None
    };
    let bpftrace = if wanted(Kind::Bpftrace) || wanted(Kind::Floor) {
        peer("bpftrace", "--version")
    } else {
        None
    };
    let mut kinds = Vec::new();
    for k in Kind::ALL {
        if !wanted(k) {
            continue;
        }
        let available = match k {
            Kind::Serve | Kind::Refused => serve_ok,
            Kind::Tcpstates => tcpstates.is_some(),
            Kind::Bpftrace | Kind::Floor => bpftrace.is_some(),
            _ => true,
        };
        if available {
            kinds.push(k);
        } else {
            let why = match k {
                Kind::Serve => "serve: not built yet, skipped".to_string(),
                _ => format!("{}: not installed, skipped", k.key()),
            };
            if k == Kind::Serve {
                println!("bench: {why}");
            }
            skipped.push(why);
        }
    }
    let clk_tck = run_for(
        Command::new("getconf").arg("CLK_TCK"),
        Duration::from_secs(5),
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(100.0);
    let state_dir = env::temp_dir().join(format!("twt-bench-{}", std::process::id()));
    fs::create_dir_all(&state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    // serve writes its stats file after dropping to an unprivileged user.
    let _ = fs::set_permissions(&state_dir, fs::Permissions::from_mode(0o755));
    let per_repeat = 2.0 * (f64::from(o.seconds) + 4.0)
        + if o.bpf_stats {
            f64::from(o.seconds.div_ceil(2).max(2)) + 4.0
        } else {
            0.0
        };
    println!(
        "bench: {} scenario(s) x {} repeats (A/B pair{}) of {} s: about {:.0} minutes{}",
        kinds.len(),
        o.repeats,
        if o.bpf_stats { " + cost run" } else { "" },
        o.seconds,
        kinds.len() as f64 * o.repeats as f64 * per_repeat / 60.0,
        o.until_ci.map_or(String::new(), |w| format!(
            ", then more repeats until each own-CPU share's interval is at most {w} wide \
             (at most {} minutes in all)",
            o.max_minutes
        ))
    );
    let mut ctx = Ctx {
        twtrace,
        loadgen: release.join("twt-loadgen"),
        tcpstates,
        bpftrace,
        state_dir: state_dir.clone(),
        clk_tck,
        seconds: o.seconds,
        threads: o.threads,
        runs: 0,
    };
    let restore = Restore::new(&state_dir)?;
    let result = bench(&mut ctx, &o, &kinds, &mut skipped);
    drop(restore);
    let _ = fs::remove_dir_all(&state_dir);
    let (sums, runs) = result?;
    let text = table(&sums, &skipped, &o);
    println!();
    print!("{text}");

    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let cpus = thread::available_parallelism().map_or(0, |n| n.get());
    let doc = obj(vec![
        ("unix_time", num(now as f64)),
        ("kernel", Json::Str(kernel)),
        ("cpus", num(cpus as f64)),
        (
            "options",
            obj(vec![
                ("repeats", num(o.repeats as f64)),
                ("seconds", num(f64::from(o.seconds))),
                ("client_threads", num(o.threads as f64)),
                ("server_threads", num(o.threads as f64)),
                ("closer", Json::Str("client".into())),
                ("family", num(4.0)),
                ("netns_tcp_max_tw_buckets", num(MAX_TW as f64)),
                // The A/B pairs always run with kernel.bpf_stats_enabled=0.
                ("cost_runs_with_bpf_stats", Json::Bool(o.bpf_stats)),
                ("until_ci", opt(o.until_ci)),
                ("max_minutes", num(o.max_minutes as f64)),
            ]),
        ),
        (
            "targets",
            obj(vec![
                ("throughput_ratio_min", num(TARGET_RATIO)),
                ("lost_events", num(0.0)),
                ("recursion_misses", num(0.0)),
                ("state_ns_per_run_max", num(TARGET_STATE_NS)),
                ("timer_ns_per_run_max", num(TARGET_TIMER_NS)),
                ("cpu_ms_per_1000_births_max", num(TARGET_CPU_MS_PER_1K)),
                ("peak_rss_mb_max", num(TARGET_RSS_MB)),
                ("serve_own_cpu_share_max", num(TARGET_SHARE)),
            ]),
        ),
        (
            "skipped",
            Json::Arr(skipped.iter().cloned().map(Json::Str).collect()),
        ),
        (
            "scenarios",
            Json::Obj(
                sums.iter()
                    .map(|s| {
                        let mut j = summary_json(s);
                        if let Json::Obj(m) = &mut j {
                            let rs: Vec<Json> = runs
                                .iter()
                                .filter(|r| r.scenario == s.kind.key())
                                .map(run_json)
                                .collect();
                            m.push(("runs".into(), Json::Arr(rs)));
                        }
                        (s.kind.key().to_owned(), j)
                    })
                    .collect(),
            ),
        ),
        ("table", Json::Str(text)),
        ("total_seconds", num(began.elapsed().as_secs_f64().round())),
    ]);
    let dir = target.join("bench");
    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = dir.join(format!("bench-{now}.json"));
    let body = doc.pretty();
    fs::write(&path, &body).map_err(|e| format!("{}: {e}", path.display()))?;
    fs::write(dir.join("latest.json"), &body).map_err(|e| format!("latest.json: {e}"))?;
    println!();
    println!("total run time: {:.0} s", began.elapsed().as_secs_f64());
    println!("results: {}", path.display());
    Ok(())
}

/// `Option::is_none_or` is newer than the Rust xtask must build with.
trait IsNoneOr<T> {
    fn is_none_or_compat(&self, f: impl FnOnce(&T) -> bool) -> bool;
}

impl<T> IsNoneOr<T> for Option<T> {
    fn is_none_or_compat(&self, f: impl FnOnce(&T) -> bool) -> bool {
        match self {
            None => true,
            Some(v) => f(v),
        }
    }
}

fn bench(
    ctx: &mut Ctx,
    o: &Opts,
    kinds: &[Kind],
    skipped: &mut Vec<String>,
) -> Result<(Vec<Summary>, Vec<Run>), String> {
    let began = Instant::now();
    // Warm-up: one short untraced run, discarded (page cache, first-run allocations).
    let warm = ctx.seconds;
    ctx.seconds = 2;
    let w = ctx.run_one(None, 'A', 0)?;
    ctx.seconds = warm;
    println!(
        "bench: warm-up: {} connections/s (discarded)",
        f0(Some(w.rate))
    );
    // The floor first: every share is measured over it.
    let mut order: Vec<Kind> = kinds
        .iter()
        .copied()
        .filter(|k| *k == Kind::Hooks)
        .collect();
    order.extend(kinds.iter().copied().filter(|k| *k != Kind::Hooks));
    let mut sums = Vec::new();
    let mut all: Vec<Run> = Vec::new();
    let mut floor = None;
    for (n, &k) in order.iter().enumerate() {
        let mut runs = Vec::new();
        let mut failed = None;
        let mut rep = 0;
        loop {
            if rep >= o.repeats {
                // --until-ci: another repeat while the share's interval is too wide and this
                // scenario's part of the time left allows.
                let Some(width) = o.until_ci.filter(|_| k.has_share()) else {
                    break;
                };
                let left = (o.max_minutes as f64 * 60.0 - began.elapsed().as_secs_f64()).max(0.0);
                let share_of_left = left / (order.len() - n) as f64;
                let est = summarize(k, &runs, floor.as_ref()).share;
                let spent = runs.iter().map(|r| r.seconds + 4.0).sum::<f64>() / rep as f64;
                match est {
                    Some(e) if e.width() <= width => break,
                    _ if rep >= 50 || spent > share_of_left => {
                        println!(
                            "bench: {:<20} stops at {rep} repeats: the time is up (interval {})",
                            k.label(),
                            est.map_or("-".into(), |e| format!("{:.4} wide", e.width()))
                        );
                        break;
                    }
                    _ => {}
                }
            }
            if let Err(e) = repeat(ctx, o, k, rep, &mut runs) {
                println!("bench: {}: {e}: scenario skipped", k.label());
                failed = Some(e);
                break;
            }
            rep += 1;
        }
        if let Some(e) = failed {
            skipped.push(format!("{}: failed: {e}", k.key()));
            continue;
        }
        let s = summarize(k, &runs, floor.as_ref());
        if k == Kind::Hooks {
            floor = Floor::of(&runs);
        }
        sums.push(s);
        all.extend(runs);
    }
    Ok((sums, all))
}

/// One repeat of a scenario: A (the load alone), B (traced), and with bpf stats the cost run C.
fn repeat(ctx: &mut Ctx, o: &Opts, k: Kind, rep: usize, runs: &mut Vec<Run>) -> Result<(), String> {
    let a = ctx.run_one(Some(k), 'A', rep)?;
    println!(
        "bench: {:<20} {:>2} A {:>9} conn/s",
        k.label(),
        rep + 1,
        f0(Some(a.rate))
    );
    let b = ctx.run_one(Some(k), 'B', rep)?;
    let extra = match &b.tracer {
        Some(t) if k.runs_twtrace() => {
            let s = t.stats.as_ref();
            format!(
                "  births {} lost {} cpu {} ms",
                f0(s.map(|s| s.f(&["births"]))),
                f0(s.map(|s| {
                    s.f(&["kernel", "lost"])
                        + s.f(&["malformed"])
                        + t.progs.iter().map(|p| p.3).sum::<f64>()
                })),
                f0(t.cpu_total_ms)
            )
        }
        _ => String::new(),
    };
    println!(
        "bench: {:<20} {:>2} B {:>9} conn/s  ratio {:.3}{extra}",
        k.label(),
        rep + 1,
        f0(Some(b.rate)),
        b.rate / a.rate
    );
    runs.push(a);
    runs.push(b);
    if o.bpf_stats {
        // With kernel.bpf_stats_enabled=1: each program's run time and run count. Not in the
        // ratios (the clock reads slow every program run).
        set_bpf_stats(true)?;
        let c = ctx.run_one(Some(k), 'C', rep);
        set_bpf_stats(false)?;
        match c {
            Ok(c) => {
                println!(
                    "bench: {:<20} {:>2} C {:>9} conn/s (cost run, bpf stats on)",
                    k.label(),
                    rep + 1,
                    f0(Some(c.rate))
                );
                runs.push(c);
            }
            Err(e) => println!("bench: {}: cost run failed: {e}", k.label()),
        }
    }
    Ok(())
}
