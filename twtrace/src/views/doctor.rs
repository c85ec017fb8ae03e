//! `twtrace doctor`: reads the settings and counters that govern TIME_WAIT in every network
//! namespace, watches the traffic for a while, and says what is wrong and what to change, each
//! namespace judged by its own numbers. Exit code 9 when a finding is at least as severe as
//! `--fail-on` (warning by default), so that scripts can use it.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write,
    net::{IpAddr, SocketAddr},
};

use serde_json::json;

use crate::{
    cli::{DoctorArgs, FailOn},
    failure::{Code, ExitWith},
    host::{
        clock,
        close_wait::CloseWait,
        collect::Request,
        netns::{self, Netns},
        sockdiag::{self, DiagSocket, state},
    },
    kernel::decode::Role,
    output::{self, printable},
    present::allocator::{self, Allocation},
    present::diagnose::{
        self, Destination, Evidence, FailedConnects, Finding, ServerPort, Severity,
    },
    say,
    track::lifecycle::{Event, FailReason},
    track::session::{self, Session},
};

/// Who, by (pid, comm), and how often.
type Whom = HashMap<(u32, String), u64>;

/// A pool's births while doctor watched: how many, the first and the last (monotonic ns).
#[derive(Clone, Copy, Default)]
struct Births {
    n: u64,
    first_ns: u64,
    last_ns: u64,
}

impl Births {
    fn add(&mut self, ts_ns: u64) {
        if self.n == 0 {
            self.first_ns = ts_ns;
        }
        self.n += 1;
        self.first_ns = self.first_ns.min(ts_ns);
        self.last_ns = self.last_ns.max(ts_ns);
    }

    /// The seconds its rate is taken over (`allocator::active_s`).
    fn active_s(&self, window: (u64, u64)) -> f64 {
        allocator::active_s(window, self.n, self.first_ns, self.last_ns)
    }
}

/// What the trace showed while doctor watched, by what it tells about ports, per namespace.
#[derive(Default)]
struct Traffic {
    /// Births of connect() without bind(): (namespace, source address, destination).
    outgoing: HashMap<(u32, IpAddr, SocketAddr), Births>,
    /// Births of sockets bound before connect(): (namespace, source address).
    bound: HashMap<(u32, IpAddr), Births>,
    /// Births of accepted connections: (namespace, listening port).
    accepted: HashMap<(u32, u16), u64>,
    /// Failed connect() calls: (namespace, source address, destination, reason), by whom.
    failures: HashMap<(u32, IpAddr, SocketAddr, FailReason), Whom>,
}

impl Traffic {
    fn feed(&mut self, ev: &Event, listening: &HashSet<(u32, u16)>) {
        match ev {
            Event::Enter(e) if !e.seeded => {
                let accepted = match e.role {
                    Role::Accepted => true,
                    Role::Connected => false,
                    Role::Unknown => listening.contains(&(e.netns, e.conn.local.port())),
                };
                if accepted {
                    *self
                        .accepted
                        .entry((e.netns, e.conn.local.port()))
                        .or_default() += 1;
                } else if e.bound {
                    self.bound
                        .entry((e.netns, e.conn.local.ip()))
                        .or_default()
                        .add(e.ts_ns);
                } else {
                    self.outgoing
                        .entry((e.netns, e.conn.local.ip(), e.conn.remote))
                        .or_default()
                        .add(e.ts_ns);
                }
            }
            Event::ConnectFail(f) => {
                let whom = match &f.owner {
                    Some(p) => (p.pid, p.comm.to_string()),
                    None => (0, "(unknown)".to_owned()),
                };
                *self
                    .failures
                    .entry((f.netns, f.conn.local.ip(), f.conn.remote, f.reason))
                    .or_default()
                    .entry(whom)
                    .or_default() += 1;
            }
            _ => {}
        }
    }

    /// Namespaces where something was born or failed.
    fn namespaces(&self) -> impl Iterator<Item = u32> + '_ {
        self.outgoing
            .keys()
            .map(|k| k.0)
            .chain(self.bound.keys().map(|k| k.0))
            .chain(self.accepted.keys().map(|k| k.0))
            .chain(self.failures.keys().map(|k| k.0))
    }
}

/// `(pid, comm, count)`, most first.
fn ranked(whom: &Whom) -> Vec<(u32, String, u64)> {
    let mut v: Vec<(u32, String, u64)> = whom
        .iter()
        .map(|((pid, comm), n)| (*pid, comm.clone(), *n))
        .collect();
    v.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    v
}

/// The pools of local ports in one namespace (see `present::allocator`), its servers, and its
/// other failed connects: every socket holding a port now (sock_diag) joined with the traffic.
fn evidence_from_sockets(
    netns: u32,
    window: (u64, u64),
    sockets: &[DiagSocket],
    traffic: &Traffic,
    listening: &HashSet<(u32, u16)>,
) -> (Vec<Destination>, Vec<FailedConnects>, Vec<ServerPort>) {
    let pool = |allocation, source, remote| Destination {
        allocation,
        source,
        remote,
        held: 0,
        in_time_wait: 0,
        births: 0,
        no_port: 0,
        active_s: 0.0,
        failing: Vec::new(),
    };
    let mut connect: BTreeMap<(IpAddr, SocketAddr), Destination> = BTreeMap::new();
    let mut bind: BTreeMap<IpAddr, Destination> = traffic
        .bound
        .iter()
        .filter(|((ns, _), _)| *ns == netns)
        .map(|(&(_, source), b)| {
            let mut d = pool(Allocation::Bind, source, None);
            d.births = b.n;
            d.active_s = b.active_s(window);
            (source, d)
        })
        .collect();
    let mut servers: BTreeMap<u16, ServerPort> = BTreeMap::new();
    for s in sockets {
        let tw = s.is_timewait() as u64;
        let port = s.conn.local.port();
        if listening.contains(&(netns, port)) {
            let e = servers.entry(port).or_insert(ServerPort {
                port,
                in_time_wait: 0,
                births: 0,
            });
            e.in_time_wait += tw;
            continue;
        }
        let source = s.conn.local.ip();
        let d = connect
            .entry((source, s.conn.remote))
            .or_insert_with(|| pool(Allocation::Connect, source, Some(s.conn.remote)));
        d.held += 1;
        d.in_time_wait += tw;
        // A port bound with bind() must be free of every socket of that address.
        if let Some(b) = bind.get_mut(&source) {
            b.held += 1;
            b.in_time_wait += tw;
        }
    }
    for (&(ns, source, remote), b) in &traffic.outgoing {
        if ns == netns {
            let d = connect
                .entry((source, remote))
                .or_insert_with(|| pool(Allocation::Connect, source, Some(remote)));
            d.births = b.n;
            d.active_s = b.active_s(window);
        }
    }
    let mut failed: BTreeMap<SocketAddr, (Vec<(FailReason, u64)>, Whom)> = BTreeMap::new();
    for (&(ns, source, remote, reason), whom) in &traffic.failures {
        if ns != netns {
            continue;
        }
        let n: u64 = whom.values().sum();
        if reason == FailReason::NoPort {
            let d = connect
                .entry((source, remote))
                .or_insert_with(|| pool(Allocation::Connect, source, Some(remote)));
            d.no_port += n;
            d.failing = ranked(whom);
        } else {
            let e = failed.entry(remote).or_default();
            e.0.push((reason, n));
            for (k, c) in whom {
                *e.1.entry(k.clone()).or_default() += c;
            }
        }
    }
    for (&(ns, port), &n) in &traffic.accepted {
        if ns == netns {
            servers
                .entry(port)
                .or_insert(ServerPort {
                    port,
                    in_time_wait: 0,
                    births: 0,
                })
                .births = n;
        }
    }
    // The sockets of a source address that binds before connect() are judged in its bind pool:
    // its per-destination pools say nothing more, unless connect() itself made or failed some.
    let mut pools: Vec<Destination> = connect
        .into_values()
        .filter(|d| !bind.contains_key(&d.source) || d.births > 0 || d.no_port > 0)
        .collect();
    pools.extend(bind.into_values());
    let failed = failed
        .into_iter()
        .map(|(remote, (mut reasons, whom))| {
            reasons.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            FailedConnects {
                remote,
                reasons,
                failing: ranked(&whom),
            }
        })
        .collect();
    (pools, failed, servers.into_values().collect())
}

/// Words into lines of at most `width` columns (a longer word gets a line of its own).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        if !cur.is_empty() && cur.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

/// Whether the findings fail the run (`--fail-on`).
pub fn fails(findings: &[Finding], fail_on: FailOn) -> bool {
    let least = match fail_on {
        FailOn::Warning => Severity::Warning,
        FailOn::Critical => Severity::Critical,
        FailOn::Never => return false,
    };
    findings.iter().any(|f| f.severity >= least)
}

pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let only = args.netns.netns.clone();
    let stats_file = output::create_opt("--stats-json", args.probe.stats_json.as_ref())?;
    // The handlers first: a signal from now on (while attaching too) ends the run cleanly.
    let stop = session::stop_signal(Some(args.duration))?;
    tokio::pin!(stop);
    // Seeded: the listeners of every namespace (accepted from connected), and the baseline of
    // every namespace's counters.
    let mut session = Session::start(args.probe.options(), true)?;
    session.gather(&Request {
        figures: Some(Vec::new()),
        close_wait: Some(only.clone()),
        lookups: Vec::new(),
    });
    if let Some(line) = session.host.tell_once() {
        say!("{line}");
    }
    let close_wait_start = session.host.close_wait.clone();
    let listening = session.listening.clone();
    say!(
        "watching for {}s; Ctrl-C to stop early",
        args.duration.as_secs_f64()
    );
    let window_start = clock::monotonic_ns();
    let mut traffic = Traffic::default();
    let wanted = |ev: &Event| only.is_empty() || only.contains(&ev.netns());
    loop {
        tokio::select! {
            r = &mut stop => { r?; break; }
            r = session.next() => {
                for ev in r?.iter().filter(|e| wanted(e)) {
                    traffic.feed(ev, &listening);
                }
            }
        }
    }
    for ev in session.finish().iter().filter(|e| wanted(e)) {
        traffic.feed(ev, &listening);
    }
    let window = (window_start, clock::monotonic_ns());
    let duration_s = (window.1 - window.0) as f64 / 1e9;

    // Every namespace (or those asked for): its figures, CLOSE_WAIT and sockets now.
    let targets: Vec<Netns> = session
        .host
        .namespaces
        .values()
        .filter(|n| only.is_empty() || only.contains(&n.inode))
        .cloned()
        .collect();
    session.gather(&Request {
        figures: Some(targets.iter().map(|n| n.inode).collect()),
        close_wait: Some(only.clone()),
        lookups: Vec::new(),
    });
    let all: Vec<u8> = (1..=11).filter(|&s| s != state::LISTEN).collect();
    let tables = netns::in_each(&targets, |_| sockdiag::dump(&all).unwrap_or_default());
    let own = netns::own();
    let host = &session.host;
    let born_in: HashSet<u32> = traffic.namespaces().collect();
    let mut judged = Vec::new();
    for ns in &targets {
        let Some(figures) = host.ledger.latest(ns.inode) else {
            continue;
        };
        let sockets = match tables.get(&ns.inode) {
            Some(Ok(s)) => s.as_slice(),
            _ => &[],
        };
        let of_ns = |list: &[CloseWait]| -> Vec<CloseWait> {
            list.iter()
                .filter(|c| c.netns == ns.inode)
                .cloned()
                .collect()
        };
        let close_wait_end = of_ns(&host.close_wait);
        // Quiet namespaces are not judged (a host has one per container): only those with
        // traffic, TIME_WAIT or CLOSE_WAIT, and twtrace's own.
        let in_play = Some(ns.inode) == own
            || born_in.contains(&ns.inode)
            || figures.sockstat_tw.is_some_and(|n| n > 0)
            || !close_wait_end.is_empty();
        if !in_play {
            continue;
        }
        let (destinations, failed_connects, servers) =
            evidence_from_sockets(ns.inode, window, sockets, &traffic, &listening);
        let counters = host.ledger.since_start(ns.inode).unwrap_or_default();
        judged.push((
            ns,
            Evidence {
                netns: Some((ns.inode, ns.label())),
                duration_s,
                settings: figures.settings.clone(),
                counters,
                resets_on_close: counters.abort_on_data + counters.abort_on_close,
                sockstat_tw: figures.sockstat_tw,
                destinations,
                failed_connects,
                servers,
                close_wait_start: of_ns(&close_wait_start),
                close_wait_end,
            },
        ));
    }
    // Namespaces are named in the findings only when more than one is judged.
    if let [(_, e)] = judged.as_mut_slice() {
        e.netns = None;
    }
    let mut findings: Vec<Finding> = judged
        .iter()
        .flat_map(|(_, e)| diagnose::diagnose(e))
        .collect();
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    let loss = session.loss();
    let serious = findings.iter().filter(|f| f.severity.serious()).count();
    let mut out: Vec<u8> = Vec::new();
    if args.json {
        let namespaces: Vec<_> = judged
            .iter()
            .map(|(n, e)| {
                let s = &e.settings;
                json!({
                    "netns": n.inode,
                    "name": n.label(),
                    "settings": settings_json(s),
                    "counters": {
                        "tw_created": e.counters.created,
                        "tw_killed": e.counters.killed,
                        "tw_recycled": e.counters.recycled,
                        "tw_overflow": e.counters.overflow,
                        "abort_on_data": e.counters.abort_on_data,
                        "abort_on_close": e.counters.abort_on_close,
                        "time_wait_now": e.sockstat_tw,
                    },
                })
            })
            .collect();
        let doc = json!({
            "duration_s": (duration_s * 10.0).round() / 10.0,
            "serious": serious,
            "namespaces": namespaces,
            // Only those found but not enterable: doctor keeps no count of live TIME_WAIT per
            // namespace, so one that was born in and not found may just be gone.
            "namespaces_unreadable": host.unreadable(std::iter::empty()),
            "lost_events": loss.total(),
            "findings": findings.iter().map(|f| json!({
                "severity": f.severity.as_str(),
                "kind": f.kind,
                "title": f.title,
                "evidence": f.evidence,
                "data": f.data,
                "remedy": f.remedy,
            })).collect::<Vec<_>>(),
        });
        writeln!(out, "{doc}")?;
    } else {
        writeln!(
            out,
            "twtrace doctor: watched {duration_s:.0} s in {} network namespace(s); {} finding(s), {serious} serious",
            judged.len(),
            findings.len()
        )?;
        if loss.total() > 0 {
            writeln!(out, "(incomplete: {})", session::loss_line(&loss))?;
        }
        // Titles and evidence name processes and namespaces: escaped for the terminal.
        for f in &findings {
            writeln!(
                out,
                "\n{:<8} {}",
                f.severity.as_str().to_uppercase(),
                printable(&f.title)
            )?;
            for e in &f.evidence {
                for line in wrap(&printable(e), 80 - 9) {
                    writeln!(out, "         {line}")?;
                }
            }
            for line in wrap(&format!("what to do: {}", f.remedy), 80 - 9) {
                writeln!(out, "         {line}")?;
            }
        }
        if findings.is_empty() {
            writeln!(out, "nothing to report")?;
        }
    }
    let written = {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        output::stdout_result(stdout.write_all(&out).and_then(|()| stdout.flush()))
    };
    session.write_stats(stats_file)?;
    written?;
    if fails(&findings, args.fail_on) {
        // The findings said it all.
        return Err(ExitWith(Code::Findings as u8).into());
    }
    Ok(())
}

fn settings_json(s: &crate::host::settings::Settings) -> serde_json::Value {
    json!({
        "tcp_tw_reuse": s.tw_reuse,
        "tcp_tw_reuse_delay_ms": s.tw_reuse_delay_ms,
        "tcp_max_tw_buckets": s.max_tw_buckets,
        "ip_local_port_range": s.port_range.map(|(a, b)| vec![a, b]),
        "ip_local_reserved_ports": s.reserved_ports.iter().map(|&(a, b)| vec![a, b]).collect::<Vec<_>>(),
        "ephemeral_ports": s.ephemeral_ports(),
        "tcp_fin_timeout": s.fin_timeout,
        "tcp_timestamps": s.timestamps,
        "tcp_tw_recycle": s.tw_recycle,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn wraps_at_the_width() {
        let lines = super::wrap("aaa bbb ccc dddddddddd e", 7);
        assert_eq!(lines, vec!["aaa bbb", "ccc", "dddddddddd", "e"]);
        assert!(super::wrap("", 5).is_empty());
    }
}
