//! One tracing session: the probes attached, the ring buffer read, the lifecycles resolved.
//! Every view drives a session and only sees `lifecycle::Event`s and loss figures.

use std::{
    collections::HashSet,
    io,
    time::{Duration, Instant},
};

use crate::{
    failure::Failure,
    host::clock::{self, WallClock},
    host::collect::{Collector, Host, Looked, Lookup, Reply, Request},
    host::netns::{self, Netns, Unreadable},
    host::sockdiag::{self, DiagSocket, state},
    kernel::decode::{KernelEvent, Role},
    kernel::probes::{KernelCounters, ProbeOptions, Probes, ProgramStats},
    kernel::source::Source,
    track::lifecycle::{Event, InOrder, Lifecycle, LifecycleStats, Substate},
};

/// Everything that was not seen, and why.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Loss {
    /// Events the kernel could not put in the ring buffer (it was full).
    pub ring_full: u64,
    /// Program runs the kernel skipped because one was already running on that CPU.
    pub recursion_misses: u64,
    /// Records that did not decode.
    pub malformed: u64,
    /// TIME_WAIT timer starts that no `FIN_WAIT2|CLOSING -> CLOSE` on their CPU took: births
    /// whose socket and owner were not seen (the kernel program's BIRTH_UNMATCHED).
    pub unjoined: u64,
}

impl Loss {
    pub fn total(&self) -> u64 {
        self.ring_full + self.recursion_misses + self.malformed + self.unjoined
    }
}

/// What tracing costs, as the kernel and the reader count it (serve exports it).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct OwnCost {
    /// Each program's runs and run time (counted while `kernel.bpf_stats_enabled` is 1) and
    /// recursion misses.
    pub programs: Vec<ProgramStats>,
    /// `kernel.bpf_stats_enabled`, when readable.
    pub bpf_stats_enabled: Option<bool>,
    pub ring_size: u64,
    /// The most bytes waiting in the ring buffer since the last snapshot.
    pub ring_fill_peak: u64,
    /// Records read from the ring buffer since start.
    pub received: u64,
    /// Seconds the last CLOSE_WAIT scan took (in the collector).
    pub closewait_scan_seconds: f64,
}

pub struct Session {
    pub probes: Probes,
    source: Source,
    lifecycle: Lifecycle,
    /// (namespace, local port) with a listener at start (sock_diag): tells accepted from
    /// connected for sockets whose opening was not seen.
    pub listening: HashSet<(u32, u16)>,
    /// What is known of the host's namespaces and their kernel figures (the first reading of
    /// each is its baseline for "since start" figures).
    pub host: Host,
    /// Gathers the host's figures in this process (None once serve hands that to its
    /// collector process).
    pub collector: Option<Collector>,
    /// Events produced before the first batch (the seeded sockets).
    carry: Vec<Event>,
    pub wall: WallClock,
    /// CONFIG_HZ, when the kernel config says.
    pub hz: Option<u32>,
    batch: Vec<KernelEvent>,
    /// Resolved events held until no earlier end can still come (see `InOrder`).
    in_order: InOrder,
    events: Vec<Event>,
    ring_size: u32,
    /// The programs' counters as serve's collector process last read them, for when this
    /// process cannot (see `Probes::try_counters`).
    pub relayed_counters: Option<KernelCounters>,
    /// When the namespaces were last discovered (`apply`).
    discovered: Instant,
    /// When `next` last handed out lookups.
    lookups_at: Instant,
}

/// How often `next` looks FIN_WAIT2 sockets up (each at most twice: `Lifecycle::substate_checks`).
const LOOKUP_EVERY: Duration = Duration::from_millis(500);

/// With typed loads only, how long a session goes without a discovery before it looks for
/// gone namespaces itself (see `Session::apply`): longer than the 1 s between the gatherings
/// of the views that ask for figures (report, top), so it never comes between two of theirs
/// and only watch, exec and doctor's window need it.
const REDISCOVER_SEEDS: Duration = Duration::from_secs(2);

impl Session {
    /// Attaches the probes. With `seed` (and always with typed loads only), the TIME_WAIT
    /// sockets that exist already are read through sock_diag (after attaching, so that none
    /// can end unseen) and come out of the first `next()` as seeded `Enter` events.
    pub fn start(opts: ProbeOptions, seed: bool) -> Result<Self, Failure> {
        // Every namespace's counters before attaching: their baseline.
        let mut collector = Collector::new();
        let mut host = Host::default();
        host.apply(collector.handle(&Request::default()));
        let ring_size = opts.ring_size;
        let mut probes = Probes::attach(opts)?;
        let ring = probes.take_ring()?;
        let source = Source::new(ring).map_err(|e| {
            Failure::new(
                crate::failure::Code::Error,
                format!("cannot poll the ring buffer: {e}"),
            )
        })?;
        let hz = clock::kernel_hz(&probes.info.release);
        if probes.info.confidentiality {
            eprintln!(
                "twtrace: {}",
                crate::kernel::preflight::CONFIDENTIALITY_LIMITS
            );
        }
        let mut lifecycle = Lifecycle::new();
        lifecycle.set_hz(hz);
        let mut session = Self {
            probes,
            source,
            lifecycle,
            listening: HashSet::new(),
            host,
            collector: Some(collector),
            carry: Vec::new(),
            wall: WallClock::now(),
            hz,
            batch: Vec::with_capacity(4096),
            in_order: InOrder::default(),
            events: Vec::with_capacity(4096),
            ring_size,
            relayed_counters: None,
            discovered: Instant::now(),
            lookups_at: Instant::now(),
        };
        if seed {
            session.seed().map_err(|e| {
                Failure::new(
                    crate::failure::Code::Error,
                    format!("cannot list the existing TIME_WAIT sockets (sock_diag): {e}"),
                )
            })?;
        } else if session.probes.typed_only {
            // With typed loads only, the end of a socket born before start names no socket:
            // the seed is all that can tell its end (at its deadline, or when its namespace is
            // dismantled). A view that did not ask for it ignores the seeded births, and can
            // do without it when sock_diag fails.
            let _ = session.seed();
        }
        Ok(session)
    }

    /// Lists the TIME_WAIT sockets and listeners of every namespace. An error in this
    /// process's own namespace is one (sock_diag unusable); another namespace that cannot be
    /// read is left out (said once by the views, from `host.denied`).
    fn seed(&mut self) -> io::Result<()> {
        let own = netns::own();
        let targets: Vec<Netns> = self.host.namespaces.values().cloned().collect();
        let tables = netns::in_each(
            &targets,
            |_| -> io::Result<(Vec<DiagSocket>, Vec<DiagSocket>)> {
                // Timewait sockets in the FIN_WAIT2 substate are listed under FIN_WAIT2.
                Ok((
                    sockdiag::dump(&[state::LISTEN])?,
                    sockdiag::dump(&[state::TIME_WAIT, state::FIN_WAIT2])?,
                ))
            },
        );
        let now = clock::monotonic_ns();
        let mut tables: Vec<(u32, Result<io::Result<_>, Unreadable>)> =
            tables.into_iter().collect();
        tables.sort_by_key(|(inode, _)| *inode);
        for (inode, r) in tables {
            let (listen, time_wait) = match r {
                Ok(Ok(t)) => t,
                Ok(Err(e)) if Some(inode) == own => return Err(e),
                _ => continue,
            };
            self.listening
                .extend(listen.iter().map(|s| (inode, s.conn.local.port())));
            for s in time_wait.into_iter().filter(DiagSocket::is_timewait) {
                let role = if self.listening.contains(&(inode, s.conn.local.port())) {
                    Role::Accepted
                } else {
                    Role::Connected
                };
                self.lifecycle.seed(
                    s.conn,
                    inode,
                    role,
                    Substate::from_kernel(s.state),
                    now,
                    s.expires_ms as u64,
                    &mut self.carry,
                );
            }
        }
        Ok(())
    }

    /// Gathers host figures in this process (see `host::collect`); returns the namespaces that
    /// are gone since the last time.
    pub fn gather(&mut self, req: &Request) -> Vec<u32> {
        match self.collector.as_mut() {
            Some(c) => {
                let reply = c.handle(req);
                self.apply(reply)
            }
            None => Vec::new(),
        }
    }

    /// Takes in what a collector gathered; returns the namespaces that are gone since the
    /// last time. With typed loads only, a gone namespace's seeded sockets end here as
    /// `killed` (`Lifecycle::end_seeds_of`): the kernel's purge of them is not told apart.
    pub fn apply(&mut self, mut reply: Reply) -> Vec<u32> {
        self.discovered = Instant::now();
        self.take_looked(std::mem::take(&mut reply.looked));
        let gone = self.host.apply(reply);
        if self.probes.typed_only && self.lifecycle.has_seeds() {
            let now = clock::monotonic_ns();
            for &netns in &gone {
                self.lifecycle.end_seeds_of(netns, now, &mut self.carry);
            }
        }
        gone
    }

    /// Waits for the next batch from the kernel; returns the lifecycle events it resolved.
    pub async fn next(&mut self) -> io::Result<&[Event]> {
        self.events.clear();
        if !self.carry.is_empty() {
            std::mem::swap(&mut self.events, &mut self.carry);
            return Ok(&self.events);
        }
        self.source.next_batch(&mut self.batch).await?;
        self.probes.flush_log();
        self.resolve(false);
        // A view that asks for no host figures (watch, exec) still sees a dismantled
        // namespace's seeded sockets end (typed loads only; see `apply`).
        if self.probes.typed_only
            && self.lifecycle.has_seeds()
            && self.collector.is_some()
            && self.discovered.elapsed() >= REDISCOVER_SEEDS
        {
            self.gather(&Request {
                figures: Some(Vec::new()),
                close_wait: None,
                lookups: Vec::new(),
            });
            self.events.append(&mut self.carry);
        }
        // FIN_WAIT2 sockets whose re-arm the timer wheel may have hidden: looked up in the
        // kernel here, or by serve's collector process (serve asks with `lookups`).
        if self.collector.is_some() && self.lookups_at.elapsed() >= LOOKUP_EVERY {
            self.lookups_at = Instant::now();
            self.look_up(clock::monotonic_ns());
            self.events.append(&mut self.carry);
        }
        Ok(&self.events)
    }

    /// Looks up, in this process, the sockets due at `now_ns` (`u64::MAX`: every one still
    /// waiting); what they show goes to `carry`.
    fn look_up(&mut self, now_ns: u64) {
        let lookups: Vec<Lookup> = self
            .lifecycle
            .substate_checks(now_ns)
            .into_iter()
            .map(|(netns, timer, conn)| Lookup { netns, timer, conn })
            .collect();
        if !lookups.is_empty()
            && let Some(c) = self.collector.as_mut()
        {
            // The lookups alone: the host's figures stay those the view last gathered.
            let reply = c.handle(&Request {
                figures: Some(Vec::new()),
                close_wait: None,
                lookups,
            });
            self.take_looked(reply.looked);
        }
    }

    /// What the lookups found: hidden re-arms come out of the next `next()`.
    fn take_looked(&mut self, looked: Vec<Looked>) {
        if looked.is_empty() {
            return;
        }
        let now = clock::monotonic_ns();
        for l in looked {
            let check = (l.lookup.netns, l.lookup.timer, l.lookup.conn);
            let at = if l.at_ns == 0 { now } else { l.at_ns };
            self.lifecycle
                .looked_up(check, l.state, l.expires_ms, at, &mut self.carry);
        }
    }

    /// The sockets to look up in the kernel now (see `Lifecycle::substate_checks`); what a
    /// collector finds goes back through `apply`.
    pub fn lookups(&mut self) -> Vec<Lookup> {
        self.lifecycle
            .substate_checks(clock::monotonic_ns())
            .into_iter()
            .map(|(netns, timer, conn)| Lookup { netns, timer, conn })
            .collect()
    }

    /// At the end: the window closes (the programs are detached, so the loss and the kernel
    /// counters read afterwards are this window's), then everything the kernel submitted is
    /// read, the seeded sockets not handed out yet (when the session ends before its first
    /// batch), every cancel still waiting is resolved, and every FIN_WAIT2 socket still to be
    /// looked up is looked up.
    pub fn finish(&mut self) -> &[Event] {
        self.events.clear();
        self.events.append(&mut self.carry);
        self.probes.detach();
        self.drain_all();
        self.probes.flush_log();
        self.resolve(true);
        // The FIN_WAIT2 sockets not looked up yet are looked up now, so that the last picture
        // (report's, exec's) has the substates the kernel has. Bounded: each call takes up to
        // 4,096 from queues of at most 65,536 each.
        for _ in 0..64 {
            if self.collector.is_none() || !self.lifecycle.checks_pending() {
                break;
            }
            self.look_up(u64::MAX);
        }
        self.events.append(&mut self.carry);
        &self.events
    }

    /// Reads the ring until it holds nothing the kernel counted as emitted: a program run that
    /// was under way on another CPU when the programs were detached may submit its record just
    /// after (the kernel counts `emitted` after each submit). Bounded: with the programs
    /// detached the count settles within microseconds.
    fn drain_all(&mut self) {
        const SETTLE: Duration = Duration::from_millis(2);
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        loop {
            let emitted = self.kernel_counters().emitted;
            self.source.drain(&mut self.batch);
            if std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(SETTLE);
            if self.source.received >= emitted && self.kernel_counters().emitted == emitted {
                return;
            }
        }
    }

    /// Resolves the batch; hands on, in time order, the events no cancel still waiting for
    /// its explanation can come before (an end is only known once its cancel is explained).
    fn resolve(&mut self, last: bool) {
        let held = self.in_order.input();
        for ev in self.batch.drain(..) {
            self.lifecycle.feed(ev, held);
        }
        if last {
            self.lifecycle.flush(held);
        } else {
            self.lifecycle.settle(clock::monotonic_ns(), held);
        }
        self.in_order
            .release(self.lifecycle.oldest_pending_ns(), &mut self.events);
    }

    /// Every TIME_WAIT socket alive now that the session knows of.
    pub fn alive(&self) -> impl Iterator<Item = crate::track::lifecycle::TwEnter> + '_ {
        self.lifecycle.alive()
    }

    /// Births and ends seen in all traffic.
    pub fn counts(&self) -> LifecycleStats {
        self.lifecycle.stats()
    }

    /// `N births, M ends, K still in TIME_WAIT` (all traffic, before any filter).
    pub fn summary(&self) -> String {
        let s = self.lifecycle.stats();
        format!(
            "{} TIME_WAIT births and {} ends seen, {} of those born still in TIME_WAIT",
            s.births,
            s.exits,
            self.lifecycle.live_count()
        )
    }

    /// What tracing costs now; the ring buffer's peak fill restarts from here.
    pub fn own_cost(&mut self) -> OwnCost {
        OwnCost {
            programs: self.probes.program_stats(),
            bpf_stats_enabled: std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
                .ok()
                .map(|v| v.trim() != "0"),
            ring_size: u64::from(self.ring_size),
            ring_fill_peak: self.source.take_fill_peak(),
            received: self.source.received,
            closewait_scan_seconds: self.host.scan_seconds,
        }
    }

    /// The kernel programs' counters: read here, or (serve after its privilege drop on
    /// kernels before 5.19) as the collector process last relayed them.
    pub fn kernel_counters(&self) -> KernelCounters {
        let own = if cfg!(debug_assertions)
            && std::env::var_os("TWTRACE_TEST_RELAY_COUNTERS").is_some()
        {
            // Debug builds: the tests take the relayed path on kernels that allow the own one.
            Err(io::Error::other("injected"))
        } else {
            self.probes.try_counters()
        };
        own.ok().or(self.relayed_counters).unwrap_or_default()
    }

    pub fn loss(&self) -> Loss {
        let counters = self.kernel_counters();
        Loss {
            ring_full: counters.lost,
            recursion_misses: self.probes.recursion_misses(),
            malformed: self.source.malformed,
            unjoined: counters.birth_unmatched,
        }
    }
}

impl Session {
    /// What this run cost and saw, as JSON (`--stats-json`): the kernel programs' counters,
    /// each program's run time, run count and recursion misses (run time only while
    /// `kernel.bpf_stats_enabled` is 1), the owner map's entries (null where it cannot be
    /// read), what userspace received, and the lifecycle's counts (`LifecycleStats`).
    pub fn stats(&self) -> serde_json::Value {
        let s = self.lifecycle.stats();
        serde_json::json!({
            "kernel": self.kernel_counters(),
            "owners": self.probes.owner_entries(),
            "programs": self.probes.program_stats(),
            "received": self.source.received,
            "malformed": self.source.malformed,
            "births": s.births,
            "exits": s.exits,
            "rearms": s.rearms,
            "hidden_rearms": s.hidden_rearms,
            "lookups_skipped": s.lookups_skipped,
            "overdue_seeds": s.overdue_seeds,
        })
    }

    /// Writes `stats()` to the `--stats-json` file (opened before the run, see
    /// `output::create`) when asked for.
    pub fn write_stats(&self, file: Option<std::fs::File>) -> anyhow::Result<()> {
        use std::io::Write as _;
        if let Some(mut f) = file {
            f.write_all(self.stats().to_string().as_bytes())
                .map_err(|e| anyhow::anyhow!("cannot write --stats-json: {e}"))?;
        }
        Ok(())
    }
}

/// Resolves on SIGINT, SIGTERM, SIGHUP (the terminal went away: stop cleanly, as for the
/// others), or after `limit`. The handlers are installed at once, before the first poll: a
/// signal that arrives before the view waits on this future still stops it.
pub fn stop_signal(
    limit: Option<Duration>,
) -> io::Result<impl std::future::Future<Output = io::Result<()>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    Ok(async move {
        let timeout = async {
            match limit {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = hup.recv() => {}
            _ = timeout => {}
        }
        Ok(())
    })
}

/// `N events lost (...)` for stderr at the end of a run.
pub fn loss_line(loss: &Loss) -> String {
    format!(
        "{} events lost (ring buffer full: {}, kernel recursion skips: {}, malformed: {}, \
         births unjoined: {})",
        loss.total(),
        loss.ring_full,
        loss.recursion_misses,
        loss.malformed,
        loss.unjoined
    )
}
