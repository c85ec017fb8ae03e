//! Load generation, one run: a fresh network namespace, the loadgen in it for the set time and
//! the tracer, if any, alongside; hands on a `Run` with the figures of both.

use std::{
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use super::{
    guard::Netns,
    kernel::{counter, host_busy_ms, irq_work, others_cpu_ms, tw_slab_objects},
    scenario::Kind,
    tracer::{http_ok, TracerResult},
    Ctx, MAX_TW,
};
use crate::{
    json::Json,
    procs::{ip, reader, wait_for, Owned},
};

#[derive(Default, Clone)]
pub(super) struct Run {
    pub(super) scenario: &'static str,
    pub(super) side: char,
    pub(super) repeat: usize,
    pub(super) connections: f64,
    pub(super) seconds: f64,
    pub(super) rate: f64,
    pub(super) errors: f64,
    pub(super) first_error: Option<String>,
    pub(super) tw: u64,
    pub(super) tw_killed: u64,
    pub(super) tw_overflow: u64,
    pub(super) tw_recycled: u64,
    pub(super) irq_work: u64,
    /// CPU ms used by other processes on the host during the load.
    pub(super) others_cpu_ms: f64,
    /// The host's busy CPU ms during the load (/proc/stat, steal excluded).
    pub(super) busy_ms: Option<f64>,
    pub(super) tracer: Option<TracerResult>,
}

impl Run {
    /// CPU ns one connection took on the host, this run's tracer included (if any): the busy CPU
    /// time less what other processes used, per connection. Kernel threads stay in: they do the
    /// load's softirq work.
    pub(super) fn host_ns_per_conn(&self) -> Option<f64> {
        let busy = self.busy_ms?;
        (self.connections > 0.0).then(|| (busy - self.others_cpu_ms) * 1e6 / self.connections)
    }
}

impl Ctx {
    /// One run of `scenario`'s load (None: the warm-up): side 'A' alone, 'B' with its tracer,
    /// 'C' the cost run (traced; the caller turns bpf stats on), half as long: the per-program
    /// figures it is for need fewer connections than a ratio.
    pub(super) fn run_one(
        &mut self,
        scenario: Option<Kind>,
        side: char,
        repeat: usize,
    ) -> Result<Run, String> {
        let kind = scenario.filter(|_| side != 'A');
        let seconds = if side == 'C' {
            self.seconds.div_ceil(2).max(2)
        } else {
            self.seconds
        };
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
        let mut mine = vec![std::process::id()];
        if let Some(t) = &tracer {
            mine.push(t.pid);
            mine.extend(&t.children);
        }
        let busy0 = host_busy_ms(self.clk_tck);
        let others0 = others_cpu_ms(&mine, self.clk_tck);
        let mut lg = Command::new(ip());
        lg.args(["netns", "exec", &ns.name])
            .arg(&self.loadgen)
            .args(["--seconds", &seconds.to_string()])
            .args(["--threads", &self.threads.to_string()])
            .args(["--max-connections", &MAX_TW.to_string()])
            .args(["--closer", "client"])
            .args(scenario.filter(|k| k.refused()).map(|_| "--refused"))
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
            Duration::from_secs(u64::from(seconds) + 30),
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
        let busy1 = host_busy_ms(self.clk_tck);
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
            scenario: scenario.map_or("warm-up", Kind::key),
            side,
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
            busy_ms: busy0.zip(busy1).map(|(a, b)| b - a),
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
