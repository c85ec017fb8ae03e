//! A tracer in one run: started and waited for until attached (`Ctx::start`), sampled while the
//! load runs, stopped with SIGINT; hands on what it cost and saw (`TracerResult`).

use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::fs::PermissionsExt,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use super::{
    kernel::{bpftool_prog, proc_children, proc_cpu, proc_hwm_kb, proc_prog_ids},
    scenario::{Kind, BPFTRACE_PROG, FLOOR_PROG},
    Ctx,
};
use crate::{
    json::Json,
    procs::{signal, wait_for, Owned},
};

/// A tracer while it runs.
pub(super) struct Tracer {
    kind: Kind,
    child: Owned,
    pub(super) pid: u32,
    lines: Arc<Mutex<Vec<String>>>,
    stdout: Option<thread::JoinHandle<String>>,
    stats_file: Option<PathBuf>,
    pub(super) serve_port: Option<u16>,
    attach_s: f64,
    cpu_attach_ms: Option<f64>,
    /// Its child processes (serve's collector) and their CPU at attach.
    pub(super) children: Vec<u32>,
    children_cpu_attach_ms: f64,
    hwm_kb: Option<u64>,
    hwm_attach_kb: Option<u64>,
    http_requests: u64,
}

fn free_port() -> Option<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    l.local_addr().ok().map(|a| a.port())
}

pub(super) fn http_ok(port: u16, path: &str) -> bool {
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
    pub(super) fn start(&self, kind: Kind, run: usize) -> Result<Tracer, String> {
        let mut stats_file = None;
        let mut serve_port = None;
        let mut cmd = match kind {
            Kind::Watch | Kind::Report | Kind::Serve | Kind::Refused | Kind::Hooks => {
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
        let children = proc_children(pid);
        let children_cpu_attach_ms = cpu_of(&children, self.clk_tck);
        Ok(Tracer {
            kind,
            child,
            pid,
            children,
            children_cpu_attach_ms,
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

/// CPU ms used so far by these processes (0 for one that is gone).
fn cpu_of(pids: &[u32], clk_tck: f64) -> f64 {
    pids.iter()
        .filter_map(|&p| proc_cpu(p, clk_tck))
        .map(|c| c.0)
        .sum()
}

/// What a tracer cost and saw in one run.
#[derive(Default, Clone)]
pub(super) struct TracerResult {
    pub(super) attach_s: f64,
    pub(super) cpu_attach_ms: Option<f64>,
    pub(super) cpu_before_int_ms: Option<f64>,
    pub(super) cpu_total_ms: Option<f64>,
    /// CPU of its child processes (serve's collector) between attach and SIGINT.
    pub(super) children_cpu_ms: f64,
    pub(super) hwm_kb: Option<u64>,
    pub(super) hwm_attach_kb: Option<u64>,
    pub(super) stopped: String,
    /// twtrace's --stats-json.
    pub(super) stats: Option<Json>,
    /// name, run_time_ns, run_cnt, recursion_misses
    pub(super) progs: Vec<(String, f64, f64, f64)>,
    /// Losses the tracer printed (tcpstates: "lost N events").
    pub(super) lost_printed: Option<f64>,
    /// bpftrace: events counted in its map.
    pub(super) counted: Option<f64>,
    pub(super) scrapes: u64,
    /// HTTP connections made to `serve` (each leaves a TIME_WAIT that twtrace counts).
    pub(super) http_requests: u64,
    pub(super) stderr_tail: Vec<String>,
}

impl Tracer {
    pub(super) fn sample(&mut self) {
        if let Some(h) = proc_hwm_kb(self.pid) {
            self.hwm_kb = Some(self.hwm_kb.unwrap_or(0).max(h));
        }
    }

    /// Reads what must be read while it runs, stops it with SIGINT and collects the rest.
    /// `scrapes`: HTTP requests made to `serve` during the load, and how many answered 200.
    pub(super) fn stop(mut self, ctx: &Ctx, scrapes: (u64, u64)) -> TracerResult {
        self.sample();
        let mut r = TracerResult {
            attach_s: self.attach_s,
            cpu_attach_ms: self.cpu_attach_ms,
            cpu_before_int_ms: proc_cpu(self.pid, ctx.clk_tck).map(|c| c.0),
            children_cpu_ms: (cpu_of(&self.children, ctx.clk_tck) - self.children_cpu_attach_ms)
                .max(0.0),
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
