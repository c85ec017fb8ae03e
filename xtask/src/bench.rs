//! `cargo +stable xtask bench`: what twtrace costs a busy host, next to the classic tools,
//! measured in one session.
//!
//! For each scenario it runs the same load twice per repeat, interleaved: A (the load alone) and
//! B (the load with one tracer attached), each run in a fresh network namespace so that the
//! TIME_WAIT of one run never slows the next; then one cost run C (traced, with
//! `kernel.bpf_stats_enabled=1`, which times every program run and so is kept out of the A/B
//! ratios). The load is `twt-loadgen` (tests/src/bin), client
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

use std::{
    collections::BTreeSet,
    env, fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex,
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::setup;

const USAGE: &str = "\
usage: cargo +stable xtask bench [--repeats N] [--seconds S] [--quick] [--threads N]
                                 [--only watch,report,serve,hooks,tcpstates,bpftrace,floor]
                                 [--no-bpf-stats]

  --repeats N   interleaved A/B pairs per scenario (default 5)
  --seconds S   load per run, seconds (default 8, at most 120)
  --quick       smoke run: 2 repeats of 3 s
  --threads N   loadgen client threads and server threads, each (default 2)
  --only LIST   only these scenarios (comma-separated)
  --no-bpf-stats  no cost run with kernel.bpf_stats_enabled=1 (no per-program run time);
                the A/B pairs always run with it off: it slows every BPF program run

Runs as root. Writes target/bench/bench-<unix time>.json and target/bench/latest.json.";

/// The targets from the issue, printed next to the figures.
const TARGET_RATIO: f64 = 0.97;
const TARGET_STATE_NS: f64 = 300.0;
const TARGET_TIMER_NS: f64 = 40.0;
const TARGET_CPU_MS_PER_1K: f64 = 20.0;
const TARGET_RSS_MB: f64 = 50.0;

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
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        repeats: 5,
        seconds: 8,
        threads: 2,
        only: None,
        quick: false,
        bpf_stats: true,
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
    Ok(o)
}

// ---------------------------------------------------------------------------------------------
// A small JSON value: parse what twtrace, bpftool and the loadgen print; write the results.

#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(s: &str) -> Result<Json, String> {
        let b = s.as_bytes();
        let mut i = 0;
        let v = parse_value(b, &mut i, 0)?;
        skip_ws(b, &mut i);
        if i != b.len() {
            return Err(format!("trailing characters at {i}"));
        }
        Ok(v)
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn num(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            _ => None,
        }
    }

    /// A number at this path of keys (0 when absent: bpftool omits zero counters).
    pub fn f(&self, path: &[&str]) -> f64 {
        let mut v = self;
        for k in path {
            match v.get(k) {
                Some(x) => v = x,
                None => return 0.0,
            }
        }
        v.num().unwrap_or(0.0)
    }

    pub fn str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(a) => a,
            _ => &[],
        }
    }

    fn write(&self, out: &mut String, indent: usize) {
        let pad = |out: &mut String, n: usize| out.extend(std::iter::repeat(' ').take(n));
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => {
                if !n.is_finite() {
                    out.push_str("null");
                } else if n.fract() == 0.0 && n.abs() < 9e15 {
                    out.push_str(&format!("{}", *n as i64));
                } else {
                    out.push_str(&format!("{}", (n * 1e4).round() / 1e4));
                }
            }
            Json::Str(s) => out.push_str(&quote(s)),
            Json::Arr(a) => {
                // Arrays of plain values on one line, of objects one per line.
                let flat = a.iter().all(|v| !matches!(v, Json::Obj(_) | Json::Arr(_)));
                out.push('[');
                for (n, v) in a.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    if !flat {
                        out.push('\n');
                        pad(out, indent + 2);
                    }
                    v.write(out, indent + 2);
                }
                if !flat && !a.is_empty() {
                    out.push('\n');
                    pad(out, indent);
                }
                out.push(']');
            }
            Json::Obj(m) => {
                out.push('{');
                for (n, (k, v)) in m.iter().enumerate() {
                    if n > 0 {
                        out.push(',');
                    }
                    out.push('\n');
                    pad(out, indent + 2);
                    out.push_str(&quote(k));
                    out.push_str(": ");
                    v.write(out, indent + 2);
                }
                if !m.is_empty() {
                    out.push('\n');
                    pad(out, indent);
                }
                out.push('}');
            }
        }
    }

    pub fn pretty(&self) -> String {
        let mut s = String::new();
        self.write(&mut s, 0);
        s.push('\n');
        s
    }
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && b[*i].is_ascii_whitespace() {
        *i += 1;
    }
}

fn parse_value(b: &[u8], i: &mut usize, depth: usize) -> Result<Json, String> {
    if depth > 64 {
        return Err("nested too deeply".into());
    }
    skip_ws(b, i);
    let bad = |i: usize| format!("unexpected input at {i}");
    match b.get(*i) {
        None => Err("unexpected end".into()),
        Some(b'{') => {
            *i += 1;
            let mut m = Vec::new();
            skip_ws(b, i);
            if b.get(*i) == Some(&b'}') {
                *i += 1;
                return Ok(Json::Obj(m));
            }
            loop {
                skip_ws(b, i);
                let Json::Str(k) = parse_value(b, i, depth + 1)? else {
                    return Err(bad(*i));
                };
                skip_ws(b, i);
                if b.get(*i) != Some(&b':') {
                    return Err(bad(*i));
                }
                *i += 1;
                let v = parse_value(b, i, depth + 1)?;
                m.push((k, v));
                skip_ws(b, i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b'}') => {
                        *i += 1;
                        return Ok(Json::Obj(m));
                    }
                    _ => return Err(bad(*i)),
                }
            }
        }
        Some(b'[') => {
            *i += 1;
            let mut a = Vec::new();
            skip_ws(b, i);
            if b.get(*i) == Some(&b']') {
                *i += 1;
                return Ok(Json::Arr(a));
            }
            loop {
                a.push(parse_value(b, i, depth + 1)?);
                skip_ws(b, i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b']') => {
                        *i += 1;
                        return Ok(Json::Arr(a));
                    }
                    _ => return Err(bad(*i)),
                }
            }
        }
        Some(b'"') => {
            *i += 1;
            let mut s = Vec::new();
            loop {
                match b.get(*i) {
                    None => return Err("unterminated string".into()),
                    Some(b'"') => {
                        *i += 1;
                        return String::from_utf8(s)
                            .map(Json::Str)
                            .map_err(|e| e.to_string());
                    }
                    Some(b'\\') => {
                        let c = *b.get(*i + 1).ok_or("unterminated string")?;
                        *i += 2;
                        match c {
                            b'n' => s.push(b'\n'),
                            b't' => s.push(b'\t'),
                            b'r' => s.push(b'\r'),
                            b'b' => s.push(8),
                            b'f' => s.push(12),
                            b'u' => {
                                let hex = b.get(*i..*i + 4).ok_or("bad \\u escape")?;
                                let hex = std::str::from_utf8(hex).map_err(|e| e.to_string())?;
                                let n = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                                *i += 4;
                                let ch = char::from_u32(n).unwrap_or('\u{fffd}');
                                let mut buf = [0u8; 4];
                                s.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                            }
                            other => s.push(other),
                        }
                    }
                    Some(&c) => {
                        s.push(c);
                        *i += 1;
                    }
                }
            }
        }
        Some(b't') if b[*i..].starts_with(b"true") => {
            *i += 4;
            Ok(Json::Bool(true))
        }
        Some(b'f') if b[*i..].starts_with(b"false") => {
            *i += 5;
            Ok(Json::Bool(false))
        }
        Some(b'n') if b[*i..].starts_with(b"null") => {
            *i += 4;
            Ok(Json::Null)
        }
        Some(c) if *c == b'-' || c.is_ascii_digit() => {
            let start = *i;
            while *i < b.len() && matches!(b[*i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                *i += 1;
            }
            let t = std::str::from_utf8(&b[start..*i]).map_err(|e| e.to_string())?;
            t.parse::<f64>()
                .map(Json::Num)
                .map_err(|_| format!("bad number '{t}'"))
        }
        Some(_) => Err(bad(*i)),
    }
}

fn obj(fields: Vec<(&str, Json)>) -> Json {
    Json::Obj(fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

fn num(n: f64) -> Json {
    Json::Num(n)
}

fn opt(n: Option<f64>) -> Json {
    n.map_or(Json::Null, Json::Num)
}

// ---------------------------------------------------------------------------------------------
// Processes, every wait bounded.

/// Runs a short command with a time limit; stdout on success.
fn run_for(cmd: &mut Command, limit: Duration) -> Result<String, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let status = wait_for(&mut child, limit, || {});
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(out),
        Some(s) => Err(format!("{what} failed ({s}): {}", err.trim())),
        None => Err(format!("{what} did not finish within {limit:?}: killed")),
    }
}

fn reader<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}

/// Waits for a child up to `limit`, calling `tick` every 50 ms; kills it after the limit
/// (None).
fn wait_for(child: &mut Child, limit: Duration, mut tick: impl FnMut()) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(_) => break,
        }
        if Instant::now() >= end {
            break;
        }
        tick();
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn signal(pid: u32, sig: &str) {
    let _ = run_for(
        Command::new("kill").args(["-s", sig, &pid.to_string()]),
        Duration::from_secs(5),
    );
}

/// A child that is killed (SIGKILL) and reaped if it is still there when this is dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn ip() -> PathBuf {
    setup::which("ip").unwrap_or_else(|| PathBuf::from("ip"))
}

// ---------------------------------------------------------------------------------------------
// What the kernel and /proc say.

/// utime + stime of a process in ms, and its state letter.
fn proc_cpu(pid: u32, clk_tck: f64) -> Option<(f64, char)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some(((utime + stime) * 1000.0 / clk_tck, state))
}

/// VmHWM in kB (absent once the process has exited).
fn proc_hwm_kb(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The BPF program ids a process holds (its fdinfo names them).
fn proc_prog_ids(pid: u32) -> BTreeSet<u64> {
    let mut ids = BTreeSet::new();
    if let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in dir.flatten() {
            if let Ok(s) = fs::read_to_string(e.path()) {
                for l in s.lines() {
                    if let Some(v) = l.strip_prefix("prog_id:") {
                        if let Ok(id) = v.trim().parse() {
                            ids.insert(id);
                        }
                    }
                }
            }
        }
    }
    ids
}

/// CPU time (ms) used so far by every userspace process but these, children reaped by them
/// included (a process that lives and dies between two readings shows in its parent's
/// cutime). Kernel threads are left out: they do our load's softirq work too.
fn others_cpu_ms(exclude: &[u32], clk_tck: f64) -> f64 {
    let mut ticks = 0.0;
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0.0;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if exclude.contains(&pid) || pid == 2 {
            continue;
        }
        let Ok(st) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = st.rfind(')') else { continue };
        let f: Vec<&str> = st[close + 1..].split_whitespace().collect();
        // Fields after the name: state ppid ... utime(11) stime(12) cutime(13) cstime(14).
        if f.get(1) == Some(&"2") {
            continue;
        }
        for i in 11..=14 {
            ticks += f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        }
    }
    ticks * 1000.0 / clk_tck
}

/// IRQ-work interrupts (the wake-ups BPF programs ask for), all CPUs.
fn irq_work() -> u64 {
    let s = fs::read_to_string("/proc/interrupts").unwrap_or_default();
    s.lines()
        .find(|l| l.trim_start().starts_with("IWI:"))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// Timewait sockets allocated on the whole host (slab objects in use).
fn tw_slab_objects() -> u64 {
    let s = fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    s.lines()
        .filter(|l| l.starts_with("tw_sock_TCP ") || l.starts_with("tw_sock_TCPv6 "))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn parse_netstat(text: &str, prefix: &str) -> Vec<(String, u64)> {
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
    let mut out = Vec::new();
    for pair in lines.chunks(2) {
        if let [names, values] = pair {
            for (k, v) in names
                .split_whitespace()
                .zip(values.split_whitespace())
                .skip(1)
            {
                if let Ok(v) = v.parse() {
                    out.push((k.to_owned(), v));
                }
            }
        }
    }
    out
}

fn counter(c: &[(String, u64)], name: &str) -> u64 {
    c.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v)
}

fn bpftool_prog(id: u64) -> Option<Json> {
    let out = run_for(
        Command::new(setup::which("bpftool")?).args(["prog", "show", "id", &id.to_string(), "-j"]),
        Duration::from_secs(10),
    )
    .ok()?;
    Json::parse(out.trim()).ok()
}

// ---------------------------------------------------------------------------------------------
// Set-up that must be undone: kernel.bpf_stats_enabled, namespaces, a guard for Ctrl-C.

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Restores kernel.bpf_stats_enabled (switched on for the cost runs only, see `set_bpf_stats`)
/// to its previous value when dropped (normal end, error, panic). A Ctrl-C kills xtask before any destructor runs: for that, a
/// guard process (its own process group, SIGINT ignored) waits for xtask to disappear and then
/// restores the value, deletes this run's namespaces and stops the tracer of the moment.
struct Restore {
    prev: String,
    flag: PathBuf,
    guard: Option<Child>,
}

impl Restore {
    fn new(state_dir: &Path) -> Result<Self, String> {
        let prev = fs::read_to_string(BPF_STATS)
            .map_err(|e| format!("cannot read {BPF_STATS}: {e}"))?
            .trim()
            .to_owned();
        let pid = std::process::id();
        let flag = state_dir.join("running");
        fs::write(&flag, "").map_err(|e| format!("cannot write {}: {e}", flag.display()))?;
        let pids = state_dir.join("pids");
        let _ = fs::write(&pids, "");
        let script = format!(
            "trap '' INT TERM HUP
while kill -0 {pid} 2>/dev/null && [ -e '{flag}' ]; do sleep 0.5; done
[ -e '{flag}' ] || exit 0
echo {prev} > {BPF_STATS}
for p in $(cat '{pids}' 2>/dev/null); do kill -INT $p 2>/dev/null; done
sleep 2
for p in $(cat '{pids}' 2>/dev/null); do kill -KILL $p 2>/dev/null; done
for ns in $({ip} netns list 2>/dev/null | cut -d' ' -f1); do
  case $ns in twt-bench-{pid}-*) {ip} netns del $ns ;; esac
done
rm -rf '{dir}'
echo 'xtask bench: interrupted: restored kernel.bpf_stats_enabled={prev}, removed its namespaces' >&2
",
            flag = flag.display(),
            pids = pids.display(),
            ip = ip().display(),
            dir = state_dir.display(),
        );
        let guard = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .ok();
        if guard.is_none() {
            eprintln!("xtask bench: no guard process: a Ctrl-C would leave bpf stats enabled");
        }
        // The throughput runs are measured without it: it adds two clock reads to every run of
        // every BPF program, which is the instrument's cost, not the tracer's.
        set_bpf_stats(false)?;
        Ok(Self { prev, flag, guard })
    }
}

fn set_bpf_stats(on: bool) -> Result<(), String> {
    fs::write(BPF_STATS, if on { "1" } else { "0" })
        .map_err(|e| format!("cannot set kernel.bpf_stats_enabled: {e}"))
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS, &self.prev) {
            eprintln!(
                "xtask bench: cannot restore kernel.bpf_stats_enabled={}: {e}",
                self.prev
            );
        }
        let _ = fs::remove_file(&self.flag);
        if let Some(mut g) = self.guard.take() {
            // It sees the flag gone within half a second and exits without touching anything.
            if wait_for(&mut g, Duration::from_secs(3), || {}).is_none() {
                eprintln!("xtask bench: the guard process did not exit: killed");
            }
        }
    }
}

/// A fresh network namespace, deleted when dropped.
struct Netns {
    name: String,
}

impl Netns {
    fn new(name: String) -> Result<Self, String> {
        let t = Duration::from_secs(10);
        run_for(Command::new(ip()).args(["netns", "add", &name]), t)?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        ns.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.tcp_max_tw_buckets={MAX_TW}"),
        ])?;
        Ok(ns)
    }

    fn exec(&self, args: &[&str]) -> Result<String, String> {
        run_for(
            Command::new(ip())
                .args(["netns", "exec", &self.name])
                .args(args),
            Duration::from_secs(10),
        )
    }

    fn tcpext(&self) -> Vec<(String, u64)> {
        self.exec(&["cat", "/proc/net/netstat"])
            .map(|t| parse_netstat(&t, "TcpExt:"))
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_for(
            Command::new(ip()).args(["netns", "del", &self.name]),
            Duration::from_secs(20),
        ) {
            eprintln!("xtask bench: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios and tracers.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Watch,
    Report,
    Serve,
    /// twtrace's floor: its hooks with programs that return at once (`--hooks-only`).
    Hooks,
    Tcpstates,
    Bpftrace,
    Floor,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Watch,
        Kind::Report,
        Kind::Serve,
        Kind::Hooks,
        Kind::Tcpstates,
        Kind::Bpftrace,
        Kind::Floor,
    ];

    fn key(self) -> &'static str {
        match self {
            Kind::Watch => "watch",
            Kind::Report => "report",
            Kind::Serve => "serve",
            Kind::Hooks => "hooks",
            Kind::Tcpstates => "tcpstates",
            Kind::Bpftrace => "bpftrace",
            Kind::Floor => "floor",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Watch => "twtrace watch",
            Kind::Report => "twtrace report",
            Kind::Serve => "twtrace serve",
            Kind::Hooks => "floor: twtrace hooks",
            Kind::Tcpstates => "tcpstates (libbpf)",
            Kind::Bpftrace => "bpftrace count",
            Kind::Floor => "floor: classic tps",
        }
    }

    /// twtrace tracing: the targets apply.
    fn twtrace(self) -> bool {
        matches!(self, Kind::Watch | Kind::Report | Kind::Serve)
    }

    /// Runs the twtrace binary (and reads its `--stats-json`).
    fn runs_twtrace(self) -> bool {
        self.twtrace() || self == Kind::Hooks
    }

    /// A floor: programs on twtrace's events that do no work.
    fn floor(self) -> bool {
        matches!(self, Kind::Hooks | Kind::Floor)
    }

    fn bpftrace(self) -> bool {
        matches!(self, Kind::Bpftrace | Kind::Floor)
    }
}

const BPFTRACE_PROG: &str =
    "tracepoint:sock:inet_sock_set_state { @states[args->newstate] = count(); }";

/// The classic floor: bpftrace programs whose filters never match, on the classic tracepoints of
/// the same four events (bpftrace 0.17 cannot attach BTF tracepoints, as twtrace does; `hooks`
/// is that floor). What attaching classic programs there costs before any program works.
const FLOOR_PROG: &str = "\
tracepoint:timer:timer_start /args->expires == 1/ { @a = count(); }
tracepoint:timer:timer_cancel /args->timer == 0/ { @b = count(); }
tracepoint:timer:timer_expire_entry /args->timer == 0/ { @c = count(); }
tracepoint:sock:inet_sock_set_state /args->newstate == 99/ { @d = count(); }";

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

/// A tracer while it runs.
struct Tracer {
    kind: Kind,
    child: Owned,
    pid: u32,
    lines: Arc<Mutex<Vec<String>>>,
    stdout: Option<thread::JoinHandle<String>>,
    stats_file: Option<PathBuf>,
    serve_port: Option<u16>,
    attach_s: f64,
    cpu_attach_ms: Option<f64>,
    hwm_kb: Option<u64>,
    hwm_attach_kb: Option<u64>,
    http_requests: u64,
}

fn free_port() -> Option<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    l.local_addr().ok().map(|a| a.port())
}

fn http_ok(port: u16, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    ) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.take(16 << 20).read_to_end(&mut buf);
    buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200")
}

impl Ctx {
    fn start(&self, kind: Kind, run: usize) -> Result<Tracer, String> {
        let mut stats_file = None;
        let mut serve_port = None;
        let mut cmd = match kind {
            Kind::Watch | Kind::Report | Kind::Serve | Kind::Hooks => {
                let f = self.state_dir.join(format!("stats-{run}.json"));
                // `serve` writes it as the unprivileged user it drops to.
                fs::write(&f, "").map_err(|e| format!("{}: {e}", f.display()))?;
                let _ = fs::set_permissions(&f, fs::Permissions::from_mode(0o666));
                let mut c = Command::new(&self.twtrace);
                match kind {
                    Kind::Watch | Kind::Hooks => {
                        // --duration only bounds it should xtask die: it is stopped by SIGINT.
                        c.args(["watch", "--json", "--duration"])
                            .arg(format!("{}s", self.seconds + 60));
                        if kind == Kind::Hooks {
                            c.arg("--hooks-only");
                        }
                    }
                    Kind::Report => {
                        c.args(["report", "--json", "--duration"])
                            .arg(format!("{}s", self.seconds + 2));
                    }
                    _ => {
                        let port = free_port().ok_or("no free port for serve")?;
                        serve_port = Some(port);
                        c.args(["serve", "--listen"])
                            .arg(format!("127.0.0.1:{port}"));
                    }
                }
                c.arg("--stats-json").arg(&f);
                stats_file = Some(f);
                c
            }
            Kind::Tcpstates => Command::new(self.tcpstates.as_ref().ok_or("no tcpstates")?),
            Kind::Bpftrace | Kind::Floor => {
                let mut c = Command::new(self.bpftrace.as_ref().ok_or("no bpftrace")?);
                c.arg("-e").arg(if kind == Kind::Floor {
                    FLOOR_PROG
                } else {
                    BPFTRACE_PROG
                });
                c
            }
        };
        cmd.stdin(Stdio::null()).stderr(Stdio::piped());
        // Outputs go to /dev/null, as for every tracer; bpftrace's (one line, then the map at
        // the end) is read.
        if kind.bpftrace() {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(Stdio::null());
        }
        let started = Instant::now();
        let mut child = Owned(
            cmd.spawn()
                .map_err(|e| format!("cannot start {kind:?}: {e}"))?,
        );
        let pid = child.0.id();
        let _ = fs::write(self.state_dir.join("pids"), pid.to_string());
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        if let Some(err) = child.0.stderr.take() {
            let lines = Arc::clone(&lines);
            thread::spawn(move || {
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    let _ = tx.send(l.clone());
                    let mut v = lines.lock().unwrap_or_else(|e| e.into_inner());
                    if v.len() < 2000 {
                        v.push(l);
                    }
                }
            });
        }
        let stdout = if kind.bpftrace() {
            // The first stdout line is "Attaching N probes...": forward it as a marker.
            let out = child.0.stdout.take();
            let (mtx, mrx) = mpsc::channel::<()>();
            let h = thread::spawn(move || {
                let mut all = String::new();
                if let Some(out) = out {
                    let mut r = BufReader::new(out);
                    let mut first = String::new();
                    let _ = r.read_line(&mut first);
                    let _ = mtx.send(());
                    all.push_str(&first);
                    let _ = r.read_to_string(&mut all);
                }
                all
            });
            let _ = mrx.recv_timeout(Duration::from_secs(20));
            Some(h)
        } else {
            None
        };
        // Wait until it is attached: twtrace says so; the peers get a fixed 2 s after their
        // start (bpftrace: after its "Attaching" line).
        let limit = Duration::from_secs(30);
        let mut http_requests = 0u64;
        let attached = loop {
            if let Ok(Some(s)) = child.0.try_wait() {
                let tail = lines.lock().map(|v| v.join(" | ")).unwrap_or_default();
                return Err(format!(
                    "{} exited before attaching ({s}): {tail}",
                    kind.label()
                ));
            }
            if started.elapsed() >= limit {
                return Err(format!("{} did not attach within {limit:?}", kind.label()));
            }
            if kind.runs_twtrace() {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(l) => {
                        if l.contains("tracing TIME_WAIT")
                            || l.contains("collecting")
                            || l.contains("serving on")
                        {
                            break true;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if let Some(p) = serve_port {
                            http_requests += 1;
                            if http_ok(p, "/healthz") {
                                break true;
                            }
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        thread::sleep(Duration::from_millis(50));
                    }
                }
            } else {
                thread::sleep(Duration::from_secs(2));
                break !proc_prog_ids(pid).is_empty();
            }
        };
        if !attached {
            return Err(format!("{} holds no BPF program after 2 s", kind.label()));
        }
        let attach_s = started.elapsed().as_secs_f64();
        let cpu_attach_ms = proc_cpu(pid, self.clk_tck).map(|c| c.0);
        Ok(Tracer {
            kind,
            child,
            pid,
            lines,
            stdout,
            stats_file,
            serve_port,
            attach_s,
            cpu_attach_ms,
            hwm_kb: proc_hwm_kb(pid),
            hwm_attach_kb: proc_hwm_kb(pid),
            http_requests,
        })
    }
}

/// What a tracer cost and saw in one run.
#[derive(Default, Clone)]
struct TracerResult {
    attach_s: f64,
    cpu_attach_ms: Option<f64>,
    cpu_before_int_ms: Option<f64>,
    cpu_total_ms: Option<f64>,
    hwm_kb: Option<u64>,
    hwm_attach_kb: Option<u64>,
    stopped: String,
    /// twtrace's --stats-json.
    stats: Option<Json>,
    /// name, run_time_ns, run_cnt, recursion_misses
    progs: Vec<(String, f64, f64, f64)>,
    /// Losses the tracer printed (tcpstates: "lost N events").
    lost_printed: Option<f64>,
    /// bpftrace: events counted in its map.
    counted: Option<f64>,
    scrapes: u64,
    /// HTTP connections made to `serve` (each leaves a TIME_WAIT that twtrace counts).
    http_requests: u64,
    stderr_tail: Vec<String>,
}

impl Tracer {
    fn sample(&mut self) {
        if let Some(h) = proc_hwm_kb(self.pid) {
            self.hwm_kb = Some(self.hwm_kb.unwrap_or(0).max(h));
        }
    }

    /// Reads what must be read while it runs, stops it with SIGINT and collects the rest.
    /// `scrapes`: HTTP requests made to `serve` during the load, and how many answered 200.
    fn stop(mut self, ctx: &Ctx, scrapes: (u64, u64)) -> TracerResult {
        self.sample();
        let mut r = TracerResult {
            attach_s: self.attach_s,
            cpu_attach_ms: self.cpu_attach_ms,
            cpu_before_int_ms: proc_cpu(self.pid, ctx.clk_tck).map(|c| c.0),
            hwm_kb: self.hwm_kb,
            hwm_attach_kb: self.hwm_attach_kb,
            scrapes: scrapes.1,
            http_requests: self.http_requests + scrapes.0,
            ..Default::default()
        };
        // Peers: their programs' counters, by the program ids the process holds.
        if !self.kind.runs_twtrace() {
            for id in proc_prog_ids(self.pid) {
                if let Some(p) = bpftool_prog(id) {
                    let name = p.get("name").and_then(Json::str).unwrap_or("?").to_owned();
                    r.progs.push((
                        name,
                        p.f(&["run_time_ns"]),
                        p.f(&["run_cnt"]),
                        p.f(&["recursion_misses"]),
                    ));
                }
            }
        }
        signal(self.pid, "INT");
        // Wait for it to exit, without reaping it: a zombie's /proc/PID/stat still holds its
        // whole CPU time (all threads), which is gone once it is reaped.
        let end = Instant::now() + Duration::from_secs(20);
        r.stopped = loop {
            match proc_cpu(self.pid, ctx.clk_tck) {
                Some((ms, 'Z')) => {
                    r.cpu_total_ms = Some(ms);
                    break "SIGINT".into();
                }
                Some(_) if Instant::now() < end => thread::sleep(Duration::from_millis(10)),
                Some(_) => break "killed: still running 20 s after SIGINT".into(),
                None => break "SIGINT (exit not observed)".into(),
            }
        };
        let status = wait_for(&mut self.child.0, Duration::from_secs(5), || {});
        if let Some(s) = status {
            if !s.success() {
                r.stopped = format!("{} ({s})", r.stopped);
            }
        }
        let _ = fs::write(ctx.state_dir.join("pids"), "");
        // Let the stderr reader drain.
        thread::sleep(Duration::from_millis(50));
        let lines = self.lines.lock().map(|v| v.clone()).unwrap_or_default();
        if let Some(f) = &self.stats_file {
            r.stats = fs::read_to_string(f)
                .ok()
                .and_then(|t| Json::parse(t.trim()).ok());
            let _ = fs::remove_file(f);
            if let Some(s) = &r.stats {
                for p in s.get("programs").map(Json::arr).unwrap_or(&[]) {
                    r.progs.push((
                        p.get("name").and_then(Json::str).unwrap_or("?").to_owned(),
                        p.f(&["run_time_ns"]),
                        p.f(&["run_cnt"]),
                        p.f(&["recursion_misses"]),
                    ));
                }
            }
        }
        if self.kind == Kind::Tcpstates {
            // libbpf-tools print "lost N events on CPU #C" for perf buffer losses.
            let lost: f64 = lines
                .iter()
                .filter_map(|l| {
                    let rest = l.split("lost ").nth(1)?;
                    rest.split_whitespace().next()?.parse::<f64>().ok()
                })
                .sum();
            r.lost_printed = Some(lost);
        }
        if let Some(h) = self.stdout.take() {
            // The map, printed at exit: "@states[7]: 123".
            let out = h.join().unwrap_or_default();
            let n: f64 = out
                .lines()
                .filter(|l| l.starts_with("@states["))
                .filter_map(|l| l.rsplit(':').next()?.trim().parse::<f64>().ok())
                .sum();
            r.counted = Some(n);
        }
        r.stderr_tail = lines.iter().rev().take(5).rev().cloned().collect();
        r
    }
}

// ---------------------------------------------------------------------------------------------
// One run.

#[derive(Default, Clone)]
struct Run {
    scenario: &'static str,
    side: char,
    repeat: usize,
    connections: f64,
    seconds: f64,
    rate: f64,
    errors: f64,
    first_error: Option<String>,
    tw: u64,
    tw_killed: u64,
    tw_overflow: u64,
    tw_recycled: u64,
    irq_work: u64,
    /// CPU ms used by other processes on the host during the load.
    others_cpu_ms: f64,
    tracer: Option<TracerResult>,
}

impl Ctx {
    fn run_one(
        &mut self,
        kind: Option<Kind>,
        scenario: &'static str,
        repeat: usize,
    ) -> Result<Run, String> {
        self.runs += 1;
        let run_no = self.runs;
        let slab_before = tw_slab_objects();
        let ns = Netns::new(format!("twt-bench-{}-{run_no}", std::process::id()))?;
        let before = ns.tcpext();
        let mut tracer = match kind {
            Some(k) => Some(self.start(k, run_no)?),
            None => None,
        };
        // serve: scraped once a second while the load runs, as a (busy) Prometheus would.
        let scraping = Arc::new(AtomicBool::new(true));
        let scraper = tracer.as_ref().and_then(|t| t.serve_port).map(|port| {
            let go = Arc::clone(&scraping);
            thread::spawn(move || {
                let (mut tried, mut n) = (0u64, 0u64);
                while go.load(Ordering::Relaxed) {
                    tried += 1;
                    if http_ok(port, "/metrics") {
                        n += 1;
                    }
                    for _ in 0..10 {
                        if !go.load(Ordering::Relaxed) {
                            break;
                        }
                        thread::sleep(Duration::from_millis(100));
                    }
                }
                (tried, n)
            })
        });
        let iwi0 = irq_work();
        let mine = [std::process::id(), tracer.as_ref().map_or(0, |t| t.pid)];
        let others0 = others_cpu_ms(&mine, self.clk_tck);
        let mut lg = Command::new(ip());
        lg.args(["netns", "exec", &ns.name])
            .arg(&self.loadgen)
            .args(["--seconds", &self.seconds.to_string()])
            .args(["--threads", &self.threads.to_string()])
            .args(["--max-connections", &MAX_TW.to_string()])
            .args(["--closer", "client"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = Owned(
            lg.spawn()
                .map_err(|e| format!("cannot start the loadgen: {e}"))?,
        );
        let out = reader(child.0.stdout.take());
        let err = reader(child.0.stderr.take());
        let mut last = Instant::now();
        let status = wait_for(
            &mut child.0,
            Duration::from_secs(u64::from(self.seconds) + 30),
            || {
                if last.elapsed() >= Duration::from_millis(500) {
                    last = Instant::now();
                    if let Some(t) = tracer.as_mut() {
                        t.sample();
                    }
                }
            },
        );
        let iwi1 = irq_work();
        let others1 = others_cpu_ms(&mine, self.clk_tck);
        let out = out.join().unwrap_or_default();
        let err = err.join().unwrap_or_default();
        let after = ns.tcpext();
        scraping.store(false, Ordering::Relaxed);
        let scrapes = scraper.map_or((0, 0), |h| h.join().unwrap_or((0, 0)));
        let tr = tracer.take().map(|t| t.stop(self, scrapes));
        let status = status.ok_or("the loadgen did not finish in time: killed")?;
        let line = out.lines().rev().find(|l| l.starts_with('{')).unwrap_or("");
        let lgj = Json::parse(line)
            .map_err(|e| format!("loadgen ({status}) printed no result ({e}): {}", err.trim()))?;
        if lgj.get("error").is_some() {
            return Err(format!("loadgen: {line}"));
        }
        let d = |k: &str| counter(&after, k).saturating_sub(counter(&before, k));
        let run = Run {
            scenario,
            side: if kind.is_some() { 'B' } else { 'A' },
            repeat,
            connections: lgj.f(&["connections"]),
            seconds: lgj.f(&["seconds"]),
            rate: lgj.f(&["connections_per_s"]),
            errors: lgj.f(&["errors"]) + lgj.f(&["server_errors"]),
            first_error: lgj
                .get("first_error")
                .and_then(Json::str)
                .map(str::to_owned),
            tw: d("TW"),
            tw_killed: d("TWKilled"),
            tw_overflow: d("TCPTimeWaitOverflow"),
            tw_recycled: d("TWRecycled"),
            irq_work: iwi1.saturating_sub(iwi0),
            others_cpu_ms: (others1 - others0).max(0.0),
            tracer: tr,
        };
        drop(ns);
        // The namespace's TIME_WAIT sockets are freed by a kworker after the delete: wait for
        // it, so that the next run does not share the CPU with it.
        let end = Instant::now() + Duration::from_secs(20);
        while tw_slab_objects() > slab_before + 2000 && Instant::now() < end {
            thread::sleep(Duration::from_millis(100));
        }
        thread::sleep(Duration::from_millis(500));
        Ok(run)
    }
}

// ---------------------------------------------------------------------------------------------
// Figures.

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn min_max(v: &[f64]) -> Option<(f64, f64)> {
    let min = v.iter().copied().reduce(f64::min)?;
    let max = v.iter().copied().reduce(f64::max)?;
    Some((min, max))
}

/// Everything printed for one scenario, from its runs.
struct Summary {
    kind: Kind,
    a_rate: Option<f64>,
    b_rate: Option<f64>,
    ratio: Option<f64>,
    ratio_spread: Option<(f64, f64)>,
    pairs: usize,
    connections: f64,
    tw: f64,
    overflow: f64,
    /// Per program: name, ns per run, runs per connection, ns per connection, recursion misses.
    progs: Vec<(String, f64, f64, f64, f64)>,
    state_ns: Option<f64>,
    timer_ns: Option<f64>,
    kernel_ns_per_conn: Option<f64>,
    kernel_ns_per_event: Option<f64>,
    runs_per_conn: Option<f64>,
    // twtrace
    births: Option<f64>,
    emitted: Option<f64>,
    received: Option<f64>,
    ring_lost: Option<f64>,
    malformed: Option<f64>,
    recursion: f64,
    lost_total: Option<f64>,
    cpu_ms_per_1k: Option<f64>,
    cpu_ms_per_1k_all: Option<f64>,
    startup_cpu_ms: Option<f64>,
    rss_mb: Option<f64>,
    rss_attach_mb: Option<f64>,
    rss_mb_per_100k: Option<f64>,
    rss_steady_mb: Option<f64>,
    // peers
    lost_printed: Option<f64>,
    counted: Option<f64>,
    iwi_per_conn_a: Option<f64>,
    iwi_per_conn_b: Option<f64>,
    /// Other processes' CPU during the runs, % of one CPU: median and max over the runs.
    others_pct: Option<f64>,
    others_pct_max: Option<f64>,
    notes: Vec<String>,
}

impl Summary {
    /// Events the kernel programs produced: emitted plus those that found the ring full.
    fn produced(&self) -> Option<f64> {
        match (self.emitted, self.ring_lost) {
            (Some(e), Some(l)) => Some(e + l),
            _ => None,
        }
    }
}

fn summarize(kind: Kind, runs: &[Run]) -> Summary {
    let a: Vec<&Run> = runs.iter().filter(|r| r.side == 'A').collect();
    let b: Vec<&Run> = runs.iter().filter(|r| r.side == 'B').collect();
    let ratios: Vec<f64> = runs
        .windows(2)
        .filter(|w| w[0].side == 'A' && w[1].side == 'B' && w[0].rate > 0.0)
        .map(|w| w[1].rate / w[0].rate)
        .collect();
    let rates = |v: &[&Run]| v.iter().map(|r| r.rate).collect::<Vec<_>>();
    let conns: f64 = b.iter().map(|r| r.connections).sum();
    let trs: Vec<&TracerResult> = b.iter().filter_map(|r| r.tracer.as_ref()).collect();
    // Each program's cost comes from the cost run: bpf stats are on only then (run counts too
    // are only kept then). Without one (--no-bpf-stats), no cost figures.
    let cost_runs: Vec<&Run> = runs.iter().filter(|r| r.side == 'C').collect();
    let cost_conns: f64 = cost_runs.iter().map(|r| r.connections).sum();
    let per_conn = |x: f64| {
        if cost_conns > 0.0 {
            Some(x / cost_conns)
        } else {
            None
        }
    };
    let cost_trs: Vec<&TracerResult> = cost_runs.iter().filter_map(|r| r.tracer.as_ref()).collect();
    // Recursion misses are counted whether or not stats are on: those of the pairs' runs, like
    // the other losses.
    let recursion: f64 = trs.iter().flat_map(|t| t.progs.iter().map(|p| p.3)).sum();
    // Programs, summed over runs by name.
    let mut names: Vec<String> = Vec::new();
    for t in &cost_trs {
        for p in &t.progs {
            if !names.contains(&p.0) {
                names.push(p.0.clone());
            }
        }
    }
    let sum_prog = |pred: &dyn Fn(&str) -> bool| {
        let (mut ns, mut cnt, mut rec) = (0.0, 0.0, 0.0);
        for t in &cost_trs {
            for p in t.progs.iter().filter(|p| pred(&p.0)) {
                ns += p.1;
                cnt += p.2;
                rec += p.3;
            }
        }
        (ns, cnt, rec)
    };
    let mut progs = Vec::new();
    for n in &names {
        let (ns, cnt, rec) = sum_prog(&|p: &str| p == n);
        progs.push((
            n.clone(),
            if cnt > 0.0 { ns / cnt } else { f64::NAN },
            per_conn(cnt).unwrap_or(f64::NAN),
            per_conn(ns).unwrap_or(f64::NAN),
            rec,
        ));
    }
    let (all_ns, all_cnt, _) = sum_prog(&|_| true);
    let (st_ns, st_cnt, _) = sum_prog(&|p: &str| {
        p.starts_with("inet_sock_set_s") || p == "handle_set_state" || p == "hook_state"
    });
    let (tm_ns, tm_cnt, _) =
        sum_prog(&|p: &str| p.starts_with("timer_") || p.starts_with("hook_timer"));
    let ratio_of = |n: f64, d: f64| if d > 0.0 { Some(n / d) } else { None };
    let stat_sum = |path: &[&str]| -> Option<f64> {
        let v: Vec<f64> = trs
            .iter()
            .filter_map(|t| t.stats.as_ref().map(|s| s.f(path)))
            .collect();
        if v.is_empty() {
            None
        } else {
            Some(v.iter().sum())
        }
    };
    let births = stat_sum(&["births"]);
    let emitted = stat_sum(&["kernel", "emitted"]);
    let ring_lost = stat_sum(&["kernel", "lost"]);
    let malformed = stat_sum(&["malformed"]);
    // twtrace's CPU: between attach and SIGINT (the steady cost of the load) and in all.
    let steady: Vec<(f64, f64)> = trs
        .iter()
        .filter_map(|t| {
            let b = t.stats.as_ref()?.f(&["births"]);
            Some((t.cpu_before_int_ms? - t.cpu_attach_ms?, b))
        })
        .collect();
    let all: Vec<(f64, f64)> = trs
        .iter()
        .filter_map(|t| {
            let b = t.stats.as_ref()?.f(&["births"]);
            Some((t.cpu_total_ms.or(t.cpu_before_int_ms)?, b))
        })
        .collect();
    let per_1k = |v: &[(f64, f64)]| {
        let ms: f64 = v.iter().map(|x| x.0).sum();
        let b: f64 = v.iter().map(|x| x.1).sum();
        ratio_of(ms * 1000.0, b)
    };
    let startup: Vec<f64> = trs.iter().filter_map(|t| t.cpu_attach_ms).collect();
    let hwm = trs.iter().filter_map(|t| t.hwm_kb).max();
    // Memory grows with the TIME_WAIT sockets alive (one entry each until it ends, 60 s):
    // the growth per birth in these short runs, and what it comes to once a full minute of
    // births at this rate is alive.
    let growth: Vec<f64> = trs
        .iter()
        .filter_map(|t| {
            let b = t.stats.as_ref()?.f(&["births"]);
            let d = t.hwm_kb? as f64 - t.hwm_attach_kb? as f64;
            (b > 0.0).then(|| d / b)
        })
        .collect();
    let base: Vec<f64> = trs
        .iter()
        .filter_map(|t| t.hwm_attach_kb.map(|k| k as f64))
        .collect();
    let kb_per_birth = median(&growth);
    let b_rate = median(&rates(&b));
    let rss_steady_mb = match (kb_per_birth, median(&base), b_rate) {
        (Some(g), Some(base), Some(r)) if kind.twtrace() => Some((base + g * r * 60.0) / 1024.0),
        _ => None,
    };
    let a_conns: f64 = a.iter().map(|r| r.connections).sum();
    let a_iwi: f64 = a.iter().map(|r| r.irq_work as f64).sum();
    let b_iwi: f64 = b.iter().map(|r| r.irq_work as f64).sum();
    let others: Vec<f64> = runs
        .iter()
        .filter(|r| r.side != 'C' && r.seconds > 0.0)
        .map(|r| r.others_cpu_ms / r.seconds / 10.0)
        .collect();
    let mut notes = Vec::new();
    let busy = others.iter().filter(|p| **p > 5.0).count();
    if busy > 0 {
        notes.push(format!(
            "{busy} of {} runs shared the host with other processes using more than 5 % of a CPU \
             (up to {:.0} %): those pairs are noisier",
            others.len(),
            min_max(&others).map_or(0.0, |m| m.1)
        ));
    }
    for r in runs {
        let run = if r.side == 'C' {
            "cost run".to_owned()
        } else {
            format!("run {}{}", r.side, r.repeat + 1)
        };
        if r.errors > 0.0 {
            notes.push(format!(
                "{run}: {} loadgen errors (first: {})",
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            ));
        }
        if r.side == 'A' && r.irq_work as f64 > r.connections / 100.0 {
            notes.push(format!(
                "{run}: {} IRQ-work interrupts with nothing of ours attached: another BPF tool \
                 was busy on the host during this untraced run",
                r.irq_work
            ));
        }
        if let Some(t) = &r.tracer {
            if !t.stopped.starts_with("SIGINT") || t.stopped.contains('(') {
                notes.push(format!("{run}: tracer {}", t.stopped));
            }
            // A floor traces nothing: no births to compare.
            if let Some(st) = t.stats.as_ref().filter(|_| kind.twtrace()) {
                let extra = st.f(&["births"]) - r.connections;
                if extra > 0.0 {
                    let http = if t.http_requests > 0 {
                        format!(
                            " ({} of them may be the HTTP requests this bench made to serve, \
                             each leaves a TIME_WAIT on the host)",
                            t.http_requests
                        )
                    } else {
                        String::new()
                    };
                    notes.push(format!(
                        "{run}: {} births more than the loadgen's connections: TIME_WAIT made \
                         by other traffic on the host while it ran (twtrace sees every \
                         namespace){http}",
                        extra
                    ));
                } else if extra < 0.0 {
                    notes.push(format!(
                        "{run}: {} births FEWER than the loadgen's connections",
                        -extra
                    ));
                }
            }
        }
    }
    Summary {
        kind,
        a_rate: median(&rates(&a)),
        b_rate: median(&rates(&b)),
        ratio: median(&ratios),
        ratio_spread: min_max(&ratios),
        pairs: ratios.len(),
        connections: conns,
        tw: b.iter().map(|r| r.tw as f64).sum(),
        overflow: b.iter().map(|r| r.tw_overflow as f64).sum(),
        progs,
        state_ns: ratio_of(st_ns, st_cnt),
        timer_ns: ratio_of(tm_ns, tm_cnt),
        kernel_ns_per_conn: per_conn(all_ns),
        kernel_ns_per_event: if kind.twtrace() {
            let cost_events: f64 = cost_trs
                .iter()
                .filter_map(|t| t.stats.as_ref())
                .map(|s| s.f(&["kernel", "emitted"]) + s.f(&["kernel", "lost"]))
                .sum();
            ratio_of(all_ns, cost_events)
        } else {
            ratio_of(all_ns, all_cnt)
        },
        runs_per_conn: per_conn(all_cnt),
        births,
        emitted,
        received: stat_sum(&["received"]),
        ring_lost,
        malformed,
        recursion,
        lost_total: if kind.twtrace() {
            Some(ring_lost.unwrap_or(0.0) + malformed.unwrap_or(0.0) + recursion)
        } else {
            None
        },
        cpu_ms_per_1k: per_1k(&steady),
        cpu_ms_per_1k_all: per_1k(&all),
        startup_cpu_ms: median(&startup),
        rss_mb: hwm.map(|k| k as f64 / 1024.0),
        rss_attach_mb: median(&base).map(|k| k / 1024.0),
        rss_mb_per_100k: kb_per_birth.map(|k| k * 100_000.0 / 1024.0),
        rss_steady_mb,
        lost_printed: {
            let v: Vec<f64> = trs.iter().filter_map(|t| t.lost_printed).collect();
            if v.is_empty() {
                None
            } else {
                Some(v.iter().sum())
            }
        },
        counted: {
            let v: Vec<f64> = trs.iter().filter_map(|t| t.counted).collect();
            if v.is_empty() {
                None
            } else {
                Some(v.iter().sum())
            }
        },
        iwi_per_conn_a: ratio_of(a_iwi, a_conns),
        iwi_per_conn_b: ratio_of(b_iwi, conns),
        others_pct: median(&others),
        others_pct_max: min_max(&others).map(|m| m.1),
        notes,
    }
}

fn f0(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => group_digits(x.round() as i64),
        _ => "-".into(),
    }
}

fn f1(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.1}"),
        _ => "-".into(),
    }
}

fn f2(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.2}"),
        _ => "-".into(),
    }
}

fn f3(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.3}"),
        _ => "-".into(),
    }
}

fn group_digits(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "meets",
        Some(false) => "MISSES",
        None => "-",
    }
}

fn table(sums: &[Summary], skipped: &[String], o: &Opts) -> String {
    let mut t = String::new();
    let mut line = |s: String| {
        t.push_str(&s);
        t.push('\n');
    };
    line(format!(
        "twtrace bench: {} interleaved A/B pairs x {} s per run; load: twt-loadgen, {} client + {} \
         server threads, client closes first, IPv4 loopback, fresh netns per run",
        o.repeats, o.seconds, o.threads, o.threads
    ));
    line(String::new());
    line(
        "throughput, connections/s (median of runs); ratio = median of per-pair B/A [min..max]"
            .into(),
    );
    line(format!(
        "  {:<20} {:>9} {:>9} {:>7}  {:<15}",
        "scenario", "alone", "traced", "ratio", "[min..max]"
    ));
    for s in sums {
        let spread = s
            .ratio_spread
            .map_or("-".into(), |(a, b)| format!("[{a:.3}..{b:.3}]"));
        line(format!(
            "  {:<20} {:>9} {:>9} {:>7}  {:<15} {} pairs, others' CPU {}% (max {}%)",
            s.kind.label(),
            f0(s.a_rate),
            f0(s.b_rate),
            f3(s.ratio),
            spread,
            s.pairs,
            f0(s.others_pct),
            f0(s.others_pct_max)
        ));
    }
    for s in skipped {
        line(format!("  {s}"));
    }
    line(String::new());
    line(format!(
        "kernel cost per program (run_time_ns / run_cnt{})",
        if o.bpf_stats {
            " and recursion misses in the cost run, kernel.bpf_stats_enabled=1"
        } else {
            "; --no-bpf-stats: not measured"
        }
    ));
    line(format!(
        "  {:<20} {:<22} {:>8} {:>10} {:>9} {:>10}",
        "scenario", "program", "ns/run", "runs/conn", "ns/conn", "rec.misses"
    ));
    for s in sums {
        let mut first = true;
        let mut name = || {
            if std::mem::replace(&mut first, false) {
                s.kind.label()
            } else {
                ""
            }
        };
        for p in &s.progs {
            line(format!(
                "  {:<20} {:<22} {:>8} {:>10} {:>9} {:>10}",
                name(),
                p.0,
                f1(Some(p.1)),
                f2(Some(p.2)),
                f0(Some(p.3)),
                f0(Some(p.4))
            ));
        }
        if s.kind.twtrace() || s.kind.floor() {
            line(format!(
                "  {:<20} {:<22} {:>8}",
                name(),
                "timer programs (avg)",
                f1(s.timer_ns)
            ));
        }
        line(format!(
            "  {:<20} {:<22} {:>8} {:>10} {:>9}   per event: {} ns",
            name(),
            "all programs",
            "",
            f2(s.runs_per_conn),
            f0(s.kernel_ns_per_conn),
            f0(s.kernel_ns_per_event)
        ));
    }
    // What a program costs beyond entering it: the hooks' programs do nothing, so their run time
    // is the entry and the timing itself.
    if let Some(h) = sums.iter().find(|s| s.kind == Kind::Hooks) {
        for s in sums.iter().filter(|s| s.kind.twtrace()) {
            let less = |x: Option<f64>, floor: Option<f64>| x.zip(floor).map(|(x, f)| x - f);
            line(format!(
                "  {:<20} own work per run, over the hooks' floor: state {} ns, timers {} ns",
                s.kind.label(),
                f1(less(s.state_ns, h.state_ns)),
                f1(less(s.timer_ns, h.timer_ns))
            ));
        }
    }
    line(String::new());
    line(
        "events (sums over the traced runs; conns: the loadgen's; TcpExt TW: the namespaces'; \
         produced: emitted + ring full; lost: ring full + malformed + recursion misses)"
            .into(),
    );
    line(format!(
        "  {:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6} {:>6} {:>9}",
        "scenario",
        "conns",
        "TcpExt TW",
        "births",
        "produced",
        "received",
        "lost",
        "rec.",
        "IWI/conn"
    ));
    for s in sums {
        let lost = if s.kind.twtrace() {
            f0(s.lost_total)
        } else {
            s.lost_printed.map_or("n/a".into(), |l| f0(Some(l)))
        };
        let births = if s.kind == Kind::Bpftrace {
            // Its count of every state change, for comparison with its run count.
            s.counted
        } else {
            s.births
        };
        line(format!(
            "  {:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6} {:>6} {:>9}",
            s.kind.label(),
            f0(Some(s.connections)),
            f0(Some(s.tw)),
            f0(births),
            f0(s.produced()),
            f0(s.received),
            lost,
            f0(Some(s.recursion)),
            f2(s.iwi_per_conn_b)
        ));
    }
    if sums.iter().any(|s| s.kind == Kind::Bpftrace) {
        line("  (bpftrace: 'births' is the number of state changes its map counted)".into());
    }
    let iwi_a: Vec<f64> = sums.iter().filter_map(|s| s.iwi_per_conn_a).collect();
    line(format!(
        "  untraced runs: {} IRQ-work interrupts per connection (the baseline for IWI/conn)",
        f2(median(&iwi_a))
    ));
    line(String::new());
    line(
        "twtrace userspace (RSS: VmHWM; at attach; growth per 100k TIME_WAIT alive; and projected \
          for 60 s of births at the traced rate, all alive)"
            .into(),
    );
    line(format!(
        "  {:<20} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "scenario",
        "CPU ms per",
        "incl. start",
        "start",
        "peak RSS",
        "at attach",
        "per 100k",
        "projected"
    ));
    line(format!(
        "  {:<20} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "", "1k births", "and exit", "CPU ms", "MB", "MB", "MB", "60 s, MB"
    ));
    for s in sums.iter().filter(|s| s.kind.twtrace()) {
        line(format!(
            "  {:<20} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10}",
            s.kind.label(),
            f2(s.cpu_ms_per_1k),
            f2(s.cpu_ms_per_1k_all),
            f0(s.startup_cpu_ms),
            f1(s.rss_mb),
            f1(s.rss_attach_mb),
            f1(s.rss_mb_per_100k),
            f0(s.rss_steady_mb)
        ));
    }
    line(String::new());
    line("targets (from the issue) next to the measured figures".into());
    let tw: Vec<&Summary> = sums.iter().filter(|s| s.kind.twtrace()).collect();
    let mut head = format!("  {:<34} {:>10}", "figure", "target");
    for s in &tw {
        head.push_str(&format!("  {:>18}", s.kind.label()));
    }
    line(head);
    let row = |name: &str, target: &str, f: &dyn Fn(&Summary) -> (String, Option<bool>)| {
        let mut l = format!("  {name:<34} {target:>10}");
        for s in &tw {
            let (v, ok) = f(s);
            l.push_str(&format!("  {:>18}", format!("{v} {}", verdict(ok))));
        }
        l
    };
    line(row("throughput ratio", ">= 0.97", &|s| {
        (f3(s.ratio), s.ratio.map(|r| r >= TARGET_RATIO))
    }));
    line(row("lost events", "0", &|s| {
        (f0(s.lost_total), s.lost_total.map(|l| l == 0.0))
    }));
    line(row("recursion misses", "0", &|s| {
        (f0(Some(s.recursion)), Some(s.recursion == 0.0))
    }));
    line(row("kernel ns per state event", "< 300", &|s| {
        (f1(s.state_ns), s.state_ns.map(|n| n < TARGET_STATE_NS))
    }));
    line(row("kernel ns per timer program run", "< 40", &|s| {
        (f1(s.timer_ns), s.timer_ns.map(|n| n < TARGET_TIMER_NS))
    }));
    line(row("CPU ms per 1,000 births", "< 20", &|s| {
        (
            f2(s.cpu_ms_per_1k),
            s.cpu_ms_per_1k.map(|n| n < TARGET_CPU_MS_PER_1K),
        )
    }));
    // The target is RSS with 100,000 TIME_WAIT sockets tracked: the peak at attach (which
    // includes start-up's transient BTF parsing, so it errs high) plus the growth per 100k
    // alive. The runs' own peak is for however many were alive at their end.
    line(row("RSS MB with 100k TIME_WAIT", "< 50", &|s| {
        let at_100k = s.rss_attach_mb.zip(s.rss_mb_per_100k).map(|(a, g)| a + g);
        (f1(at_100k), at_100k.map(|n| n < TARGET_RSS_MB))
    }));
    let mut check = format!("  {:<34} {:>10}", "sanity: births - connections", "0");
    for s in &tw {
        let d = s.births.map(|b| b - s.connections);
        check.push_str(&format!(
            "  {:>18}",
            d.map_or("-".into(), |d| format!("{:+}", d as i64))
        ));
    }
    line(check);
    let notes: Vec<String> = sums
        .iter()
        .flat_map(|s| {
            s.notes
                .iter()
                .map(move |n| format!("{}: {n}", s.kind.label()))
        })
        .collect();
    if !notes.is_empty() {
        line(String::new());
        line("notes".into());
        for n in notes {
            line(format!("  {n}"));
        }
    }
    t
}

fn run_json(r: &Run) -> Json {
    let tracer = r.tracer.as_ref().map_or(Json::Null, |t| {
        obj(vec![
            ("attach_s", num(t.attach_s)),
            ("cpu_ms_at_attach", opt(t.cpu_attach_ms)),
            ("cpu_ms_before_sigint", opt(t.cpu_before_int_ms)),
            ("cpu_ms_total", opt(t.cpu_total_ms)),
            ("vm_hwm_kb", opt(t.hwm_kb.map(|k| k as f64))),
            (
                "vm_hwm_kb_at_attach",
                opt(t.hwm_attach_kb.map(|k| k as f64)),
            ),
            ("stopped", Json::Str(t.stopped.clone())),
            ("stats", t.stats.clone().unwrap_or(Json::Null)),
            (
                "programs",
                Json::Arr(
                    t.progs
                        .iter()
                        .map(|p| {
                            obj(vec![
                                ("name", Json::Str(p.0.clone())),
                                ("run_time_ns", num(p.1)),
                                ("run_cnt", num(p.2)),
                                ("recursion_misses", num(p.3)),
                            ])
                        })
                        .collect(),
                ),
            ),
            ("lost_printed", opt(t.lost_printed)),
            ("counted", opt(t.counted)),
            ("scrapes", num(t.scrapes as f64)),
            ("http_requests", num(t.http_requests as f64)),
            (
                "stderr_tail",
                Json::Arr(t.stderr_tail.iter().cloned().map(Json::Str).collect()),
            ),
        ])
    });
    obj(vec![
        ("side", Json::Str(r.side.to_string())),
        ("repeat", num(r.repeat as f64 + 1.0)),
        ("connections", num(r.connections)),
        ("seconds", num(r.seconds)),
        ("connections_per_s", num(r.rate)),
        ("errors", num(r.errors)),
        (
            "first_error",
            r.first_error.clone().map_or(Json::Null, Json::Str),
        ),
        ("tcpext_tw", num(r.tw as f64)),
        ("tcpext_tw_killed", num(r.tw_killed as f64)),
        ("tcpext_tw_overflow", num(r.tw_overflow as f64)),
        ("tcpext_tw_recycled", num(r.tw_recycled as f64)),
        ("irq_work_interrupts", num(r.irq_work as f64)),
        ("other_processes_cpu_ms", num(r.others_cpu_ms)),
        ("tracer", tracer),
    ])
}

fn summary_json(s: &Summary) -> Json {
    obj(vec![
        ("median_connections_per_s_alone", opt(s.a_rate)),
        ("median_connections_per_s_traced", opt(s.b_rate)),
        ("ratio_median", opt(s.ratio)),
        ("ratio_min", opt(s.ratio_spread.map(|x| x.0))),
        ("ratio_max", opt(s.ratio_spread.map(|x| x.1))),
        ("pairs", num(s.pairs as f64)),
        ("connections_traced", num(s.connections)),
        ("tcpext_tw_traced", num(s.tw)),
        ("tcpext_tw_overflow", num(s.overflow)),
        (
            "programs",
            Json::Arr(
                s.progs
                    .iter()
                    .map(|p| {
                        obj(vec![
                            ("name", Json::Str(p.0.clone())),
                            ("ns_per_run", num(p.1)),
                            ("runs_per_connection", num(p.2)),
                            ("ns_per_connection", num(p.3)),
                            ("recursion_misses", num(p.4)),
                        ])
                    })
                    .collect(),
            ),
        ),
        ("state_ns_per_run", opt(s.state_ns)),
        ("timer_ns_per_run", opt(s.timer_ns)),
        ("kernel_ns_per_connection", opt(s.kernel_ns_per_conn)),
        ("kernel_ns_per_event", opt(s.kernel_ns_per_event)),
        ("program_runs_per_connection", opt(s.runs_per_conn)),
        ("births", opt(s.births)),
        ("emitted", opt(s.emitted)),
        ("received", opt(s.received)),
        ("ring_full_lost", opt(s.ring_lost)),
        ("malformed", opt(s.malformed)),
        ("recursion_misses", num(s.recursion)),
        ("lost_total", opt(s.lost_total)),
        ("lost_printed", opt(s.lost_printed)),
        ("bpftrace_counted", opt(s.counted)),
        ("cpu_ms_per_1000_births", opt(s.cpu_ms_per_1k)),
        (
            "cpu_ms_per_1000_births_incl_start_exit",
            opt(s.cpu_ms_per_1k_all),
        ),
        ("startup_cpu_ms_median", opt(s.startup_cpu_ms)),
        ("peak_rss_mb", opt(s.rss_mb)),
        ("rss_at_attach_mb", opt(s.rss_attach_mb)),
        ("rss_growth_mb_per_100k_births", opt(s.rss_mb_per_100k)),
        ("rss_projected_60s_of_births_mb", opt(s.rss_steady_mb)),
        ("irq_work_per_connection_alone", opt(s.iwi_per_conn_a)),
        ("irq_work_per_connection_traced", opt(s.iwi_per_conn_b)),
        (
            "notes",
            Json::Arr(s.notes.iter().cloned().map(Json::Str).collect()),
        ),
    ])
}

// ---------------------------------------------------------------------------------------------

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let l = s.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            l.split_whitespace().nth(2).map(|e| e == "0")
        })
        .unwrap_or(false)
}

fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(d) => crate::root().join(d),
        None => crate::root().join("target"),
    }
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
    let target = target_dir();
    let release = target.join("release");
    let twtrace = release.join("twtrace");
    let wanted = |k: Kind| {
        o.only
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
            Kind::Serve => serve_ok,
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
    let per_run = f64::from(o.seconds) + 4.0;
    println!(
        "bench: {} scenario(s) x {} pairs x {} s: about {:.0} minutes",
        kinds.len(),
        o.repeats,
        o.seconds,
        (kinds.len() * o.repeats * 2 + 1) as f64 * per_run / 60.0
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
                ("cost_run_with_bpf_stats", Json::Bool(o.bpf_stats)),
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
    // Warm-up: one short untraced run, discarded (page cache, first-run allocations).
    let warm = ctx.seconds;
    ctx.seconds = 2;
    let w = ctx.run_one(None, "warm-up", 0)?;
    ctx.seconds = warm;
    println!(
        "bench: warm-up: {} connections/s (discarded)",
        f0(Some(w.rate))
    );
    let mut sums = Vec::new();
    let mut all = Vec::new();
    for &k in kinds {
        let mut runs = Vec::new();
        let mut failed = None;
        for rep in 0..o.repeats {
            let a = ctx.run_one(None, k.key(), rep)?;
            println!(
                "bench: {:<20} {}/{} A {:>9} conn/s",
                k.label(),
                rep + 1,
                o.repeats,
                f0(Some(a.rate))
            );
            runs.push(a);
            match ctx.run_one(Some(k), k.key(), rep) {
                Ok(b) => {
                    let extra = match &b.tracer {
                        Some(t) if k.twtrace() => {
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
                        "bench: {:<20} {}/{} B {:>9} conn/s  ratio {:.3}{extra}",
                        k.label(),
                        rep + 1,
                        o.repeats,
                        f0(Some(b.rate)),
                        b.rate / runs.last().map_or(f64::NAN, |a: &Run| a.rate)
                    );
                    runs.push(b);
                }
                Err(e) => {
                    println!("bench: {}: {e}: scenario skipped", k.label());
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            skipped.push(format!("{}: failed: {e}", k.key()));
            continue;
        }
        if o.bpf_stats {
            // One more traced run, with kernel.bpf_stats_enabled=1: each program's run time and
            // run count. Not in the ratios (the clock reads slow every program run).
            set_bpf_stats(true)?;
            let c = ctx.run_one(Some(k), k.key(), o.repeats);
            set_bpf_stats(false)?;
            match c {
                Ok(mut c) => {
                    c.side = 'C';
                    println!(
                        "bench: {:<20} cost run (bpf stats on) {:>9} conn/s",
                        k.label(),
                        f0(Some(c.rate))
                    );
                    runs.push(c);
                }
                Err(e) => println!("bench: {}: cost run failed: {e}", k.label()),
            }
        }
        sums.push(summarize(k, &runs));
        all.extend(runs);
    }
    Ok((sums, all))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let t = r#"{"a": [1, 2.5, -3e2], "b": {"c": "x\"y\u00e9", "d": null, "e": true}}"#;
        let v = Json::parse(t).unwrap();
        assert_eq!(v.f(&["b", "zz"]), 0.0);
        assert_eq!(v.get("a").unwrap().arr().len(), 3);
        assert_eq!(v.get("b").unwrap().get("c").unwrap().str(), Some("x\"yé"));
        assert_eq!(Json::parse(&v.pretty()).unwrap(), v);
    }

    #[test]
    fn netstat_pairs() {
        let t = "TcpExt: SyncookiesSent TW TWKilled\nTcpExt: 0 81361 2\nIpExt: A\nIpExt: 1\n";
        let c = parse_netstat(t, "TcpExt:");
        assert_eq!(counter(&c, "TW"), 81361);
        assert_eq!(counter(&c, "TWKilled"), 2);
        assert_eq!(counter(&c, "A"), 0);
    }

    #[test]
    fn medians_and_digits() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(group_digits(1234567), "1,234,567");
        assert_eq!(group_digits(-999), "-999");
    }
}
