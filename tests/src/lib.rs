//! Harness for the integration tests: they run the real `twtrace` binary as root, load its real
//! programs into the running kernel, make real TCP traffic (on loopback and in network
//! namespaces they create) and compare with the kernel's own accounting.
//!
//! Nothing here mocks the kernel. Every wait is bounded.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    path::PathBuf,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

// What the tests of the deployment files share (they need no root and load nothing).
pub mod deploy;
// twtrace's man pages and shell completions, generated from its clap definitions.
pub mod docs;
// What `cargo +stable xtask dist` built, for the install tests.
pub mod dist;
// A real Prometheus scraping twtrace serve.
pub mod prometheus;

/// The directory of the build the test runs from (target/<profile>): the test executable sits
/// in its `deps/`.
fn build_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

/// The twtrace binary under test: `TWTRACE_BIN`, or the one of the same build.
pub fn twtrace_bin() -> PathBuf {
    std::env::var_os("TWTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| build_dir().join("twtrace"))
}

/// The churn generator (this package's binary, built with the tests).
pub fn churn_bin() -> PathBuf {
    build_dir().join("twt-churn")
}

/// The integration tests load programs into the kernel: they need root, and say so.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "integration tests load eBPF programs and create network namespaces: run them as root \
         (cargo +stable xtask test does)"
    );
    assert!(
        twtrace_bin().exists(),
        "{} is missing: build it first (cargo +stable xtask test does)",
        twtrace_bin().display()
    );
}

/// A port no other test uses, from a range outside the ephemeral one, and that no socket of
/// this host holds now: a TIME_WAIT left by an earlier test binary lives 60 s, and the views that
/// read existing TIME_WAIT at start (report, serve) would count it.
pub fn unique_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        // Spread by pid so that two test binaries running at once do not collide.
        let port = (20000 + ((std::process::id() % 200) * 40 + n) % 12000) as u16;
        let out = Command::new("ss")
            .args(["-Htan", &format!("( sport = :{port} or dport = :{port} )")])
            .output();
        match out {
            Ok(o) if o.status.success() && !o.stdout.is_empty() => continue,
            _ => return port,
        }
    }
}

/// A `--duration` for a `report` or `doctor` whose window the test ends with `Run::interrupt`
/// once its traffic is done and the kernel shows it: the window follows the traffic however
/// slow the machine (a kernel booted under emulation runs it several times slower), and this
/// only bounds a test that never interrupts.
pub const UNTIL_INTERRUPTED: &str = "300s";

/// Polls `now` until it returns `want` (10 s at most) and returns its last value: for what the
/// kernel shows a moment after the traffic that makes it (the last TIME_WAIT of a client is born
/// when its server's FIN arrives, after the client returned).
pub fn wait_for<T: PartialEq>(want: T, now: impl Fn() -> T) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = now();
        if v == want || Instant::now() > deadline {
            return v;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the running kernel is locked down in confidentiality mode. twtrace loads there with
/// typed loads only and says once, on stderr, what that costs (`CONFIDENTIALITY_LIMITS`; README,
/// Requirements): the FIN_WAIT2 substate is told by its timeout alone (not when
/// tcp_fin_timeout is 60 s, the default), and a TIME_WAIT born before start ends unseen, taken
/// as expired at its deadline (or as killed once its namespace is gone). The tests that meet
/// those limits check exactly that there (the kernel matrix's `6.1+confidentiality` lane).
pub fn confidentiality() -> bool {
    std::fs::read_to_string("/sys/kernel/security/lockdown")
        .is_ok_and(|t| twtrace::kernel::preflight::lockdown_confidentiality(&t))
}

/// The line twtrace prints on stderr under `lockdown=confidentiality`.
pub fn confidentiality_line() -> String {
    format!(
        "twtrace: {}\n",
        twtrace::kernel::preflight::CONFIDENTIALITY_LIMITS
    )
}

/// Polls `now` until `done` holds for its value (30 s at most) and returns its last value: for
/// what a daemon shows a moment after the traffic (serve gathers its figures once a second, and
/// a guest under emulation is several times slower).
pub fn poll_until<T>(now: impl Fn() -> T, done: impl Fn(&T) -> bool) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = now();
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// CLOCK_MONOTONIC in seconds, the clock `ClientRun::first_error_at` is on: one clock for
/// every process of the machine, namespaces included (twt-churn stamps its failures with it).
pub fn monotonic_s() -> f64 {
    twtrace::host::clock::monotonic_ns() as f64 / 1e9
}

/// Checks that a failure doctor predicted came when it said, within 20 %. doctor counts the
/// time left from the sockets it reads once its window has closed, before it exits: the moment
/// its prediction starts from lies between its window's end (`duration_s`, which it reports)
/// and its exit (`exited_s`), both from its start; `actual` is the client's first failure on
/// the same timeline (`ClientRun::first_error_at` less the test's `monotonic_s()` at doctor's
/// start: an emulated guest takes a second or more to start the client). On a fast machine
/// the two ends meet; on a slow one doctor's reading takes seconds, and only an instant in
/// between is right.
pub fn assert_prediction(duration_s: f64, exited_s: f64, time_left_s: f64, actual: f64) {
    let (earliest, latest) = (duration_s + time_left_s, exited_s + time_left_s);
    assert!(
        earliest <= 1.2 * actual && latest >= 0.8 * actual,
        "predicted failure between {earliest:.1} s and {latest:.1} s (window {duration_s:.1} s, \
         exit {exited_s:.1} s, {time_left_s:.0} s left), first failure at {actual:.1} s"
    );
}

/// A directory of the test's own (`$TMPDIR/twt-TAG-PID`), removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("twt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A field of /proc/PID/status (`Uid`, `CapEff`, ...), trimmed; empty when absent. `pid` may
/// be `"self"`.
pub fn proc_status(pid: impl std::fmt::Display, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"))
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default()
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sh(script: &str) -> String {
    run(Command::new("sh").arg("-c").arg(script))
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// A network namespace of the test's own, deleted on drop: clean kernel counters, no
/// interference from the host's traffic.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "twt-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `ip netns exec NAME ARGS...` as a Command (the program keeps its pid across the exec).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).args(args);
        c
    }

    /// A veth pair between this namespace and `peer`, with an address on each end (`a/24`
    /// here, `b/24` there), both up.
    pub fn link(&self, peer: &Netns, a: &str, b: &str) {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let here = format!("tv{}a{n}", std::process::id() % 100_000);
        let there = format!("tv{}b{n}", std::process::id() % 100_000);
        self.exec_ok(&[
            "ip", "link", "add", &here, "type", "veth", "peer", "name", &there, "netns", &peer.name,
        ]);
        self.exec_ok(&["ip", "addr", "add", &format!("{a}/24"), "dev", &here]);
        self.exec_ok(&["ip", "link", "set", &here, "up"]);
        peer.exec_ok(&["ip", "addr", "add", &format!("{b}/24"), "dev", &there]);
        peer.exec_ok(&["ip", "link", "set", &there, "up"]);
    }

    pub fn exec_ok(&self, args: &[&str]) -> String {
        run(&mut self.command(args))
    }

    /// Its inode number: what twtrace reports as `netns` (`ip netns identify` shows the name).
    pub fn inode(&self) -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.name))
            .expect("named namespace")
            .ino() as u32
    }

    /// Sets a sysctl of this namespace (the namespace goes away with its settings).
    pub fn sysctl(&self, name: &str, value: &str) {
        self.exec_ok(&["sysctl", "-q", "-w", &format!("{name}={value}")]);
    }

    /// TcpExt counters of this namespace (/proc/net/netstat as its processes see it).
    pub fn tcpext(&self) -> HashMap<String, u64> {
        twtrace::host::counters::parse_netstat(
            &self.exec_ok(&["cat", "/proc/net/netstat"]),
            "TcpExt:",
        )
    }

    /// What the kernel shows of this namespace's TCP, for a failing count to explain itself:
    /// every socket neither listening nor in TIME_WAIT (`ss`), sockstat (which counts those), and
    /// the TcpExt counters that are not 0.
    pub fn tcp_picture(&self) -> String {
        let mut nonzero: Vec<(String, u64)> =
            self.tcpext().into_iter().filter(|(_, v)| *v != 0).collect();
        nonzero.sort();
        format!(
            "{}\n{}\nTcpExt: {nonzero:?}",
            self.exec_ok(&[
                "ss",
                "-tanoH",
                "state",
                "all",
                "exclude",
                "listening",
                "exclude",
                "time-wait"
            ]),
            self.exec_ok(&["cat", "/proc/net/sockstat"]).trim()
        )
    }

    /// The `tw` figure of /proc/net/sockstat: timewait sockets alive now.
    pub fn sockstat_tw(&self) -> u64 {
        twtrace::host::counters::sockstat_tw_from(&self.exec_ok(&["cat", "/proc/net/sockstat"]))
            .unwrap_or(0)
    }

    /// TIME_WAIT 4-tuples from sock_diag, through `ss` (local, remote).
    pub fn ss_time_wait(&self, port: u16) -> Vec<(String, String)> {
        ss_time_wait(Some(self), port)
    }

    /// `ss_time_wait` once it lists `n` sockets (bounded: 10 s, then what it lists). A timewait
    /// socket born before its peer's FIN arrived sits in the FIN_WAIT2 substate, which `ss state
    /// time-wait` does not show (sock_diag reports `tw_substate`), so a birth twtrace saw can be
    /// missing from `ss` for as long as that FIN takes (tcp_rcv_state_process's FIN_WAIT1 case:
    /// the peer's ACK without its FIN makes a FIN_WAIT2-substate timewait socket).
    pub fn ss_time_wait_settled(&self, port: u16, n: usize) -> Vec<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ss = self.ss_time_wait(port);
            if ss.len() >= n || Instant::now() > deadline {
                return ss;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The `tw` figure of /proc/net/sockstat in the network namespace of process `pid`.
pub fn sockstat_tw_of(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/net/sockstat");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    twtrace::host::counters::sockstat_tw_from(&text).unwrap_or(0)
}

/// TIME_WAIT 4-tuples (local, remote) with `port` on either side, from sock_diag through `ss`,
/// in `ns` or else in this process's namespace.
pub fn ss_time_wait(ns: Option<&Netns>, port: u16) -> Vec<(String, String)> {
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let args = ["ss", "-Htan", "state", "time-wait", &filter];
    let out = match ns {
        Some(ns) => ns.exec_ok(&args),
        None => run(Command::new(args[0]).args(&args[1..])),
    };
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Recv-Q Send-Q Local Peer
            (f.len() >= 4).then(|| (norm_ss(f[2]), norm_ss(f[3])))
        })
        .collect()
}

/// How much TcpExt counter `key` grew from `before` to `after` (two `Netns::tcpext()`).
pub fn tcpext_delta(after: &HashMap<String, u64>, before: &HashMap<String, u64>, key: &str) -> u64 {
    after.get(key).copied().unwrap_or(0) - before.get(key).copied().unwrap_or(0)
}

/// Timewait sockets TcpExt counted from `before` to `after`: `TW`, plus `TWKilled` (those
/// whose timeout was 4 s or less). When the kernel counts them: `tw_counted()`.
pub fn tw_counted_between(after: &HashMap<String, u64>, before: &HashMap<String, u64>) -> u64 {
    tcpext_delta(after, before, "TW") + tcpext_delta(after, before, "TWKilled")
}

/// When the running kernel counts a timewait socket in TcpExt `TW` (or `TWKilled`, for those
/// whose timeout is 4 s or less).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TwCounted {
    /// When it is born: `__inet_twsk_schedule` counts it as it first arms the timer, since
    /// Linux 5.18 (27dd35e02235, "tcp/dccp: no longer use twsk_net(tw) from
    /// tw_timer_handler()": the timer may fire after its namespace is gone, so the counting
    /// moved to where the namespace is known to be alive). Debian 12's 6.1, Debian 13's 6.12.
    AtBirth,
    /// When its timer expires (`tw_timer_handler`), and never when it ends early (a reuse, a
    /// SYN, a reset): before 5.18, so Debian 11's 5.10 (measured there: 10 closes leave `TW`
    /// unchanged and sockstat `tw` 10; 60 s later `TW` has grown by 10).
    AtExpiry,
}

/// (major, minor) of a kernel release (`uname -r`: `5.10.0-46-cloud-amd64`, `6.12.118`).
pub fn version_of(release: &str) -> (u32, u32) {
    let mut n = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    (n.next().unwrap_or(0), n.next().unwrap_or(0))
}

/// (major, minor) of the running kernel.
pub fn kernel_version() -> (u32, u32) {
    version_of(
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .expect("osrelease")
            .trim(),
    )
}

/// `TwCounted` for a kernel release (`uname -r`: `5.10.0-46-cloud-amd64`, `6.12.118`).
pub fn tw_counted_by(release: &str) -> TwCounted {
    if version_of(release) >= (5, 18) {
        TwCounted::AtBirth
    } else {
        TwCounted::AtExpiry
    }
}

/// `TwCounted` for the running kernel.
pub fn tw_counted() -> TwCounted {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("osrelease");
    tw_counted_by(release.trim())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `ss` prints v4-mapped addresses as `[::ffff:127.0.0.1]:80`; twtrace shows them as IPv4.
fn norm_ss(s: &str) -> String {
    match s.strip_prefix("[::ffff:") {
        Some(rest) if rest.contains('.') => rest.replacen("]:", ":", 1),
        _ => s.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// twtrace under test

/// `twtrace watch --json ...`, running until stopped.
pub struct Watch {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::sync::Arc<Mutex<String>>,
}

pub struct WatchResult {
    pub events: Vec<Value>,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Watch {
    /// Starts watching and returns once the programs are attached.
    pub fn start(args: &[&str]) -> Self {
        let mut child = Command::new(twtrace_bin())
            .arg("watch")
            .arg("--json")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn twtrace");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let err_buf = stderr.clone();
        let mut err = child.stderr.take().expect("stderr");
        thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut signalled = false;
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = err_buf.lock().unwrap();
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
                if !signalled && s.contains("tracing TIME_WAIT") {
                    signalled = true;
                    let _ = ready_tx.send(());
                }
            }
            let _ = ready_tx.send(());
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(20));
        let mut w = Watch {
            child,
            lines,
            stderr,
        };
        if let Ok(Some(status)) = w.child.try_wait() {
            panic!(
                "twtrace watch exited at start ({status}): {}",
                w.stderr.lock().unwrap()
            );
        }
        assert!(
            w.stderr.lock().unwrap().contains("tracing TIME_WAIT"),
            "twtrace watch did not start in 20 s: {}",
            w.stderr.lock().unwrap()
        );
        w
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Collects events until `pred` holds over everything seen, or `timeout` passes.
    pub fn wait_until(
        &self,
        timeout: Duration,
        seen: &mut Vec<Value>,
        pred: impl Fn(&[Value]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(seen) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self
                .lines
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) => seen.push(parse_line(&line)),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return pred(seen),
            }
        }
    }

    /// Sends `signal`, waits for the exit (bounded) and returns everything it printed.
    pub fn stop_with(mut self, signal: i32, mut seen: Vec<Value>) -> WatchResult {
        // Let the last events through the poll interval first.
        thread::sleep(Duration::from_millis(300));
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("twtrace did not exit within 10 s of signal {signal}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            seen.push(parse_line(&line));
        }
        // The stderr reader finishes when the pipe closes.
        thread::sleep(Duration::from_millis(100));
        let stderr = self.stderr.lock().unwrap().clone();
        WatchResult {
            events: seen,
            stderr,
            status,
        }
    }

    pub fn stop(self) -> WatchResult {
        self.stop_with(libc::SIGINT, Vec::new())
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse_line(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

impl WatchResult {
    pub fn of_kind<'a>(&'a self, event: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.events.iter().filter(move |e| e["event"] == event)
    }

    pub fn lost(&self) -> u64 {
        lost_from(&self.stderr)
    }
}

/// `N events lost` from twtrace's closing line.
pub fn lost_from(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| {
            let i = l.find(" events lost")?;
            l[..i].rsplit(' ').next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no 'events lost' line in: {stderr}"))
}

/// A twtrace command that runs to its end (`report`, ...), started in the background.
pub struct Run {
    child: Child,
    stderr: std::sync::Arc<Mutex<String>>,
}

pub struct RunResult {
    pub stdout: String,
    pub stderr: String,
    pub status: ExitStatus,
}

impl Run {
    /// Starts `twtrace ARGS` and returns once it printed `ready` on stderr (or exited).
    pub fn start(args: &[&str], ready: &str) -> Self {
        Self::start_in(None, args, ready)
    }

    /// The same, run inside `ns` (`ip netns exec`) when given.
    pub fn start_in(ns: Option<&Netns>, args: &[&str], ready: &str) -> Self {
        let bin = twtrace_bin();
        let cmd = match ns {
            Some(ns) => {
                let mut all = vec![bin.to_str().expect("utf-8 path")];
                all.extend_from_slice(args);
                ns.command(&all)
            }
            None => {
                let mut c = Command::new(&bin);
                c.args(args);
                c
            }
        };
        Self::spawn(cmd, ready)
    }

    /// Starts `cmd` (a twtrace however it is reached: a chroot, a container) and returns once
    /// it printed `ready` on stderr (or exited), 20 s at most.
    pub fn spawn(mut cmd: Command, ready: &str) -> Self {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let stderr = std::sync::Arc::new(Mutex::new(String::new()));
        let buf = stderr.clone();
        let mut err = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        let ready = ready.to_owned();
        thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            let mut sent = false;
            while let Ok(n) = err.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                let mut s = buf.lock().unwrap();
                s.push_str(&String::from_utf8_lossy(&chunk[..n]));
                if !sent && s.contains(&ready) {
                    sent = true;
                    let _ = tx.send(());
                }
            }
            let _ = tx.send(());
        });
        let _ = rx.recv_timeout(Duration::from_secs(20));
        Run { child, stderr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it printed on stderr so far, and where each of its threads is in the kernel (state,
    /// wchan and stack from /proc): for a failure message when it stops answering.
    pub fn where_now(&self) -> String {
        let pid = self.child.id();
        let mut out = format!("stderr so far:\n{}\n", self.stderr.lock().unwrap());
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
            .unwrap_or_default();
        for t in tasks {
            let read = |f: &str| std::fs::read_to_string(t.join(f)).unwrap_or_default();
            let stat = read("stat");
            let state = stat.rsplit(") ").next().unwrap_or("").split(' ').next();
            out.push_str(&format!(
                "{} {} state {} wchan {}\n{}",
                t.display(),
                read("comm").trim(),
                state.unwrap_or("?"),
                read("wchan"),
                read("stack")
            ));
        }
        out
    }

    /// Stops it as Ctrl-C does (SIGINT: a `report` or `doctor` then ends its window and
    /// prints), and waits (at most `limit`) for it to end. For a window that ends when the
    /// test's traffic has, however long that took: a `--duration` long enough for a slow
    /// machine, ended by this.
    pub fn interrupt(self, limit: Duration) -> RunResult {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.finish(limit)
    }

    /// Waits (at most `limit`) for the command to end.
    pub fn finish(mut self, limit: Duration) -> RunResult {
        let deadline = Instant::now() + limit;
        let mut stdout = String::new();
        let mut out = self.child.stdout.take().expect("stdout");
        let reader = thread::spawn(move || {
            let _ = out.read_to_string(&mut stdout);
            stdout
        });
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("twtrace did not finish within {limit:?}");
            }
            thread::sleep(Duration::from_millis(50));
        };
        let stdout = reader.join().expect("stdout reader");
        thread::sleep(Duration::from_millis(50));
        RunResult {
            stdout,
            stderr: self.stderr.lock().unwrap().clone(),
            status,
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 exchange with a server under test (no client crate needed): the status
/// (0 when nothing answers) and the body.
pub fn http(addr: &str, request: &[u8]) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    http(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

// ---------------------------------------------------------------------------------------------
// Traffic

/// A `twt-churn server`, stopped on drop.
pub struct Server {
    child: Child,
    _stdin: ChildStdin,
    pub pid: u32,
}

impl Server {
    /// Starts a server (in `ns` when given) and waits until it listens.
    pub fn start(ns: Option<&Netns>, listen: &str, extra: &[&str]) -> Self {
        let mut args = vec!["--listen", listen];
        args.extend_from_slice(extra);
        let mut child = churn(ns, "server", &args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn twt-churn server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("server output");
        assert!(line.starts_with("listening"), "server said: {line}");
        let stdin = child.stdin.take().expect("stdin");
        let pid = child.id();
        Server {
            child,
            _stdin: stdin,
            pid,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a `twt-churn client` run did.
#[derive(Debug)]
pub struct ClientRun {
    pub pid: u32,
    pub local_ports: Vec<u16>,
    /// Failed connect() calls by errno name (`--tolerate-errors`).
    pub errors: std::collections::BTreeMap<String, u64>,
    /// Seconds from the client's start to its first failed connect().
    pub first_error_s: Option<f64>,
    /// When its first connect() failed, on `monotonic_s`'s clock.
    pub first_error_at: Option<f64>,
}

impl ClientRun {
    fn from_json(v: &Value, pid: u32) -> Self {
        assert_eq!(
            v["pid"], pid,
            "the client keeps its pid through ip netns exec"
        );
        ClientRun {
            pid,
            local_ports: v["local_ports"]
                .as_array()
                .expect("ports")
                .iter()
                .map(|p| p.as_u64().expect("port") as u16)
                .collect(),
            errors: v["errors"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default(),
            first_error_s: v["first_error_s"].as_f64(),
            first_error_at: v["first_error_at"].as_f64(),
        }
    }
}

/// The command line of a `twt-churn MODE ARGS` (in `ns` when given).
fn churn(ns: Option<&Netns>, mode: &str, args: &[&str]) -> Command {
    churn_as(ns, None, mode, args)
}

/// The same, as user and group `uid` with no supplementary group when given (`setpriv`, which
/// keeps the pid, as `ip netns exec` does).
fn churn_as(ns: Option<&Netns>, uid: Option<u32>, mode: &str, args: &[&str]) -> Command {
    let churn = churn_bin();
    let churn = churn.to_str().expect("utf-8 path");
    let ids = uid.map(|u| [format!("--reuid={u}"), format!("--regid={u}")]);
    let mut all: Vec<&str> = Vec::new();
    if let Some([reuid, regid]) = &ids {
        all.extend(["setpriv", reuid.as_str(), regid.as_str(), "--clear-groups"]);
    }
    all.extend([churn, mode]);
    all.extend_from_slice(args);
    match ns {
        Some(ns) => ns.command(&all),
        None => {
            let mut c = Command::new(all[0]);
            c.args(&all[1..]);
            c
        }
    }
}

/// A `twt-churn client --leak` that keeps its sockets (CLOSE_WAIT once its server closed)
/// until dropped.
pub struct Holder {
    child: Child,
    _stdin: ChildStdin,
    pub run: ClientRun,
}

impl Holder {
    pub fn start(ns: Option<&Netns>, args: &[&str]) -> Self {
        Self::start_as(ns, None, args)
    }

    /// The same, as user `uid` when given: its /proc/PID/fd (mode 0500, its own) and fd links
    /// are then another user's, which root reads only with CAP_DAC_READ_SEARCH and
    /// CAP_SYS_PTRACE.
    pub fn start_as(ns: Option<&Netns>, uid: Option<u32>, args: &[&str]) -> Self {
        let mut all = args.to_vec();
        all.push("--leak");
        let mut child = churn_as(ns, uid, "client", &all)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn twt-churn client");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("client output");
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let run = ClientRun::from_json(&v, child.id());
        let stdin = child.stdin.take().expect("stdin");
        Holder {
            child,
            _stdin: stdin,
            run,
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `twt-churn namespaces --count N --per-ns M`: N network namespaces made, used (M TIME_WAIT
/// each) and gone, one after the other.
pub fn churn_namespaces(count: u32, per_ns: u32) {
    run(&mut churn(
        None,
        "namespaces",
        &[
            "--count",
            &count.to_string(),
            "--per-ns",
            &per_ns.to_string(),
        ],
    ));
}

/// Runs a `twt-churn client` to completion (in `ns` when given).
pub fn client(ns: Option<&Netns>, args: &[&str]) -> ClientRun {
    let child = churn(ns, "client", args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn twt-churn client");
    let pid = child.id();
    let out = child.wait_with_output().expect("client output");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("client JSON");
    ClientRun::from_json(&v, pid)
}

/// Names of the BPF programs loaded in the kernel now (bpftool), to check nothing is left.
pub fn loaded_program_names() -> Vec<String> {
    let out = run(Command::new("bpftool").args(["-j", "prog", "show"]));
    let v: Value = serde_json::from_str(&out).expect("bpftool JSON");
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

static KERNEL: RwLock<()> = RwLock::new(());

/// Held by every test that loads twtrace, so that the tests which count what is loaded in the
/// kernel (`exclusive`) do not see another test's programs.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    KERNEL.read().unwrap_or_else(|e| e.into_inner())
}

pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    KERNEL.write().unwrap_or_else(|e| e.into_inner())
}

/// How many of twtrace's programs are loaded (every program twtrace can attach, by name).
pub fn twtrace_programs_loaded() -> usize {
    use twtrace::kernel::probes::{FORK_PROGRAM, HOOKS_ONLY, PROGRAMS};
    let ours: Vec<&str> = PROGRAMS
        .iter()
        .chain(HOOKS_ONLY.iter())
        .chain([FORK_PROGRAM].iter())
        .map(|(name, _)| *name)
        .collect();
    // bpftool shows the full name when the program carries BTF, else the kernel's 15 bytes.
    loaded_program_names()
        .iter()
        .filter(|n| {
            ours.iter()
                .any(|o| o == n || (n.len() == 15 && o.starts_with(n.as_str())))
        })
        .count()
}

/// `twtrace_programs_loaded()` once it equals `expected`, or after 5 s: the kernel frees a
/// detached program only after an RCU grace period, so a count right after an exit can lag.
pub fn settled_programs(expected: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = twtrace_programs_loaded();
        if n == expected || Instant::now() > deadline {
            return n;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The count of twtrace programs loaded, once programs of tests that just ended are freed: the
/// baseline a test compares with (a count taken right after another test's twtrace exited can
/// still include its programs, see `settled_programs`). Waits until the count stops falling
/// for half a second, 5 s at most.
pub fn quiet_programs() -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = twtrace_programs_loaded();
    let mut since = Instant::now();
    while last > 0 && Instant::now() < deadline && since.elapsed() < Duration::from_millis(500) {
        thread::sleep(Duration::from_millis(100));
        let n = twtrace_programs_loaded();
        if n < last {
            since = Instant::now();
        }
        last = n;
    }
    last
}

pub fn write_all(path: &str, value: &str) {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .unwrap_or_else(|e| panic!("write {path}: {e}"));
}

/// Socket addresses for the traffic generators' raw `bind`/`connect` calls.
pub mod sock {
    use std::net::SocketAddr;

    /// `addr` as a `sockaddr_in` or `sockaddr_in6` in a `sockaddr_storage`, with its length.
    pub fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
        // SAFETY: zeroed sockaddr_storage is valid; we fill the right variant.
        let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match addr {
            SocketAddr::V4(a) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as u16,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from_ne_bytes(a.ip().octets()),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_in fits in sockaddr_storage.
                unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
                size_of::<libc::sockaddr_in>()
            }
            SocketAddr::V6(a) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as u16,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                // SAFETY: sockaddr_in6 fits in sockaddr_storage.
                unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
                size_of::<libc::sockaddr_in6>()
            }
        };
        (ss, len as libc::socklen_t)
    }
}

/// Checks a timeout the kernel armed, as twtrace reports it (`timeout_ms`,
/// `fin_wait2_timeout_ms`): the kernel computes `expires = jiffies + timeo` a moment before the
/// `timer:timer_start` tracepoint fires, where the program reads jiffies again, and a tick can
/// fall between: what remains is then one tick short. An emulated CPU can be stopped between
/// the two for longer (59,996 ms at HZ=250 seen on 6.1 under qemu's TCG, 59,992 on 6.12), so up
/// to 100 ms short is allowed, a tenth of the smallest difference the tests tell apart (5 s
/// from 60 s, 59 s from 60 s); never longer than armed.
pub fn assert_armed_ms(got: &Value, armed_ms: u64, what: &str) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // Without the kernel's config, the coarsest tick Linux has (HZ=100).
    let hz = twtrace::host::clock::kernel_hz(release.trim()).unwrap_or(100) as u64;
    let short_ms = 1000_u64.div_ceil(hz).max(100);
    let ms = got
        .as_u64()
        .unwrap_or_else(|| panic!("{what}: no timeout in {got}"));
    assert!(
        ms <= armed_ms && ms + short_ms >= armed_ms,
        "{what}: {ms} ms left of {armed_ms} ms armed ({short_ms} ms short at most)"
    );
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn tcpext_tw_counts_births_from_5_18() {
        assert_eq!(tw_counted_by("5.10.0-46-cloud-amd64"), TwCounted::AtExpiry);
        assert_eq!(tw_counted_by("5.17.15"), TwCounted::AtExpiry);
        assert_eq!(tw_counted_by("5.18.0"), TwCounted::AtBirth);
        assert_eq!(tw_counted_by("6.1.0-57-cloud-amd64"), TwCounted::AtBirth);
        assert_eq!(tw_counted_by("6.12.118"), TwCounted::AtBirth);
        assert_eq!(tw_counted_by("6.18.3+deb14-amd64"), TwCounted::AtBirth);
    }
}
