//! From evidence to findings: `doctor`'s reasoning, pure and unit-tested. Each finding says
//! what is wrong, the numbers that show it, and what to change.

use std::net::{IpAddr, SocketAddr};

use serde_json::{Value, json};

use crate::{
    host::{close_wait::CloseWait, counters::TwCounters, settings::Settings},
    present::allocator::{self, Allocation, Demand},
    track::lifecycle::FailReason,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }

    /// Worth failing a script for.
    pub fn serious(self) -> bool {
        self >= Severity::Warning
    }
}

/// Sockets of this host that draw on one pool of local ports: towards one destination from one
/// source address (connect() without bind()), or from one source address towards every
/// destination (bind() before connect()). See `present::allocator`.
#[derive(Clone, Debug, PartialEq)]
pub struct Destination {
    pub allocation: Allocation,
    pub source: IpAddr,
    /// None for `Allocation::Bind`.
    pub remote: Option<SocketAddr>,
    /// Sockets holding a local port in that pool now, in any state (TIME_WAIT included).
    pub held: u64,
    pub in_time_wait: u64,
    /// TIME_WAIT births in that pool while doctor watched.
    pub births: u64,
    /// Seconds over which `births` came (`allocator::active_s`); 0: the whole window.
    pub active_s: f64,
    /// connect() calls that found no local port while doctor watched, and by whom:
    /// (pid, comm, count), most first.
    pub no_port: u64,
    pub failing: Vec<(u32, String, u64)>,
}

/// connect() calls towards a destination that failed for another reason than a port (refused,
/// unanswered, unreachable, given up), while doctor watched.
#[derive(Clone, Debug, PartialEq)]
pub struct FailedConnects {
    pub remote: SocketAddr,
    /// (reason, count), most first.
    pub reasons: Vec<(FailReason, u64)>,
    pub failing: Vec<(u32, String, u64)>,
}

/// A listening port on which this host closed first.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerPort {
    pub port: u16,
    pub in_time_wait: u64,
    pub births: u64,
}

/// What was measured in one network namespace (each has its own ports, settings and
/// counters; findings are judged with that namespace's numbers).
#[derive(Clone, Debug, Default)]
pub struct Evidence {
    /// The namespace (inode, name) when findings must say which one they are about (more than
    /// one in play); None leaves them unlabelled.
    pub netns: Option<(u32, String)>,
    pub duration_s: f64,
    pub settings: Settings,
    /// TcpExt deltas over the watch.
    pub counters: TwCounters,
    /// TcpExt TCPAbortOnData and TCPAbortOnClose over the watch: closes that sent a reset
    /// (see `TwCounters`).
    pub resets_on_close: u64,
    pub sockstat_tw: Option<u64>,
    pub destinations: Vec<Destination>,
    pub failed_connects: Vec<FailedConnects>,
    pub servers: Vec<ServerPort>,
    pub close_wait_start: Vec<CloseWait>,
    pub close_wait_end: Vec<CloseWait>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finding {
    pub severity: Severity,
    pub kind: &'static str,
    pub title: String,
    /// What was measured, as lines for a person.
    pub evidence: Vec<String>,
    /// The same, as numbers for a program.
    pub data: Value,
    pub remedy: String,
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// `api[4121] 312, worker[4130] 20`.
fn who(failing: &[(u32, String, u64)]) -> String {
    failing
        .iter()
        .take(3)
        .map(|(pid, comm, n)| format!("{comm}[{pid}] {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One pool of local ports judged with the allocator model: the finding shows its arithmetic
/// and the settings it used.
fn port_exhaustion(ev: &Evidence, d: &Destination) -> Option<Finding> {
    let (usable, usable_line) = allocator::usable_line(&ev.settings)?;
    let demand = Demand {
        allocation: d.allocation,
        source: d.source,
        remote: d.remote,
        held: d.held,
        in_time_wait: d.in_time_wait,
        births: d.births,
        no_port: d.no_port,
    };
    let reuse = allocator::reuse(&ev.settings, d.allocation, d.remote);
    let over = if d.active_s > 0.0 {
        d.active_s
    } else {
        ev.duration_s
    };
    let v = allocator::judge(&demand, usable, over, reuse);
    let usable_f = usable.max(1) as f64;
    let held_share = d.held as f64 / usable_f;
    let needed_share = v.needed_share();
    // With reuse, a full range is recycled, not exhausted: what it needs is what counts.
    let held_counts = !v.reuse.applies;
    let severity = if d.no_port > 0
        || v.time_left_s.is_some_and(|t| t < allocator::TIME_WAIT_S)
        || (held_counts && held_share >= 0.9)
    {
        Severity::Critical
    } else if needed_share >= 0.5 || (held_counts && held_share >= 0.5) {
        Severity::Warning
    } else if needed_share >= 0.1 || held_share >= 0.1 {
        Severity::Info
    } else {
        return None;
    };
    let place = match (d.allocation, d.remote) {
        (Allocation::Connect, Some(r)) => format!("{} -> {r}", d.source),
        _ => format!("{} (bind() before connect(), every destination)", d.source),
    };
    let mut evidence = vec![
        match d.allocation {
            Allocation::Connect => format!(
                "{} of {usable} usable local ports held towards it ({} in TIME_WAIT)",
                d.held, d.in_time_wait
            ),
            Allocation::Bind => format!(
                "{} of {usable} usable local ports of {} held, all destinations together ({} in \
                 TIME_WAIT): a port bound with bind() is the address's for every destination",
                d.held, d.source, d.in_time_wait
            ),
        },
        usable_line,
        format!("{:.1} new connections/s closed first by this host", v.rate),
        v.reuse.why.clone(),
        if v.reuse.applies {
            format!(
                "ports needed at steady state: {} open + {:.1}/s x {:.1} s = {:.0}",
                demand.open(),
                v.rate,
                v.reuse.delay_ms as f64 / 1000.0,
                v.needed
            )
        } else {
            format!(
                "ports needed at steady state: {} open + {:.1}/s x 60 s in TIME_WAIT = {:.0}",
                demand.open(),
                v.rate,
                v.needed
            )
        },
    ];
    if d.no_port > 0 {
        evidence.push(format!(
            "already failing: {} connect() calls found no local port in {:.0} s (EADDRNOTAVAIL), \
             from {}",
            d.no_port,
            ev.duration_s,
            who(&d.failing)
        ));
    } else {
        match v.time_left_s {
            Some(t) if t <= 0.0 => evidence.push(
                "the ports are used up: the next connect() that needs a new one fails".into(),
            ),
            Some(t) => evidence.push(format!(
                "at this rate {} starts failing with {} in about {t:.0} s",
                if d.allocation == Allocation::Bind {
                    "bind()"
                } else {
                    "connect()"
                },
                if d.allocation == Allocation::Bind {
                    "EADDRINUSE"
                } else {
                    "EADDRNOTAVAIL"
                }
            )),
            None if v.reuse.applies && held_share >= 0.5 => evidence.push(format!(
                "no failure expected: TIME_WAIT older than {} ms are taken over (TcpExt \
                 TWRecycled rose by {} while watched)",
                v.reuse.delay_ms, ev.counters.recycled
            )),
            None => {}
        }
    }
    let remedy = match d.allocation {
        Allocation::Bind => "Set IP_BIND_ADDRESS_NO_PORT on the socket before bind() (the port \
             is then chosen at connect(), per destination), or do not bind() at all; better \
             still, reuse connections (keep-alive, a pool) so that fewer ports are taken."
            .to_owned(),
        Allocation::Connect => {
            let mut r = "Reuse connections to this destination (HTTP keep-alive, a connection \
                 pool) instead of opening one per request: that removes the TIME_WAIT at its \
                 source."
                .to_owned();
            if !v.reuse.applies {
                r.push_str(
                    " Until then: net.ipv4.tcp_tw_reuse=1 lets outgoing connections reuse \
                     TIME_WAIT older than a second (timestamps must be on);",
                );
            } else {
                r.push_str(" Until then:");
            }
            r.push_str(
                " a wider net.ipv4.ip_local_port_range gives more room, and connecting from \
                 several source addresses multiplies it (ports are per source address and \
                 destination).",
            );
            r
        }
    };
    Some(Finding {
        severity,
        kind: "port_exhaustion",
        title: if severity.serious() {
            format!("ephemeral ports running out: {place}")
        } else {
            format!("many ephemeral ports held: {place}")
        },
        evidence,
        data: json!({
            "allocation": match d.allocation { Allocation::Connect => "connect", Allocation::Bind => "bind" },
            "source": d.source.to_string(),
            "destination": d.remote.map(|r| r.to_string()),
            "held": d.held,
            "in_time_wait": d.in_time_wait,
            "usable_ports": usable,
            "births": d.births,
            "rate_per_s": round1(v.rate),
            "rate_over_s": round1(over),
            "steady_state": v.needed.round(),
            "time_left_s": v.time_left_s.map(|t| t.round()),
            "tw_reuse_applies": v.reuse.applies,
            "tw_reuse_delay_ms": v.reuse.delay_ms,
            "no_port_failures": d.no_port,
            "failing": d.failing.iter().map(|(pid, comm, n)| json!({"pid": pid, "comm": comm, "count": n})).collect::<Vec<_>>(),
            "settings": {
                "ip_local_port_range": ev.settings.port_range.map(|(a, b)| vec![a, b]),
                "tcp_tw_reuse": ev.settings.tw_reuse,
                "tcp_timestamps": ev.settings.timestamps,
            },
        }),
        remedy,
    })
}

/// connect() failures other than for lack of a port.
fn failed_connects(ev: &Evidence, f: &FailedConnects) -> Finding {
    let total: u64 = f.reasons.iter().map(|(_, n)| n).sum();
    let reasons: Vec<String> = f
        .reasons
        .iter()
        .map(|(r, n)| format!("{n} {} ({})", r.as_str(), r.errno()))
        .collect();
    Finding {
        severity: if total >= 10 {
            Severity::Warning
        } else {
            Severity::Info
        },
        kind: "connect_failures",
        title: format!("connect() to {} fails", f.remote),
        evidence: vec![format!(
            "{total} failed in {:.0} s: {}; from {}",
            ev.duration_s,
            reasons.join(", "),
            who(&f.failing)
        )],
        data: json!({
            "destination": f.remote.to_string(),
            "failures": total,
            "reasons": f.reasons.iter().map(|(r, n)| json!({"reason": r.as_str(), "count": n})).collect::<Vec<_>>(),
            "failing": f.failing.iter().map(|(pid, comm, n)| json!({"pid": pid, "comm": comm, "count": n})).collect::<Vec<_>>(),
        }),
        remedy: "Refused: nothing listens there (or a firewall rejects); unanswered: the peer or \
                 the path drops the SYN. Neither holds a local port for long, but retries in a \
                 loop add churn: back off between attempts."
            .into(),
    }
}

pub fn diagnose(ev: &Evidence) -> Vec<Finding> {
    let mut out = Vec::new();
    let s = &ev.settings;

    for d in &ev.destinations {
        out.extend(port_exhaustion(ev, d));
    }
    for f in &ev.failed_connects {
        out.push(failed_connects(ev, f));
    }

    if ev.counters.overflow > 0 {
        out.push(Finding {
            severity: Severity::Critical,
            kind: "tw_overflow",
            title: "TIME_WAIT skipped: tcp_max_tw_buckets is full".into(),
            evidence: vec![format!(
                "{} connections closed without TIME_WAIT in {:.0} s (TcpExt TCPTimeWaitOverflow); {} TIME_WAIT now, limit {}",
                ev.counters.overflow,
                ev.duration_s,
                ev.sockstat_tw.map_or("?".into(), |n| n.to_string()),
                s.max_tw_buckets.map_or("?".into(), |n| n.to_string())
            )],
            data: json!({"skipped": ev.counters.overflow, "time_wait": ev.sockstat_tw, "max_tw_buckets": s.max_tw_buckets}),
            remedy: "Late segments of those connections can now corrupt new ones on the same \
                     4-tuple. Find who makes the TIME_WAIT (`twtrace report`) and reuse \
                     connections there; raising net.ipv4.tcp_max_tw_buckets costs memory but \
                     restores the protection."
                .into(),
        });
    } else if let (Some(tw), Some(max)) = (ev.sockstat_tw, s.max_tw_buckets)
        && max > 0
        && tw as f64 >= 0.8 * max as f64
    {
        out.push(Finding {
            severity: Severity::Warning,
            kind: "tw_buckets_headroom",
            title: "TIME_WAIT close to tcp_max_tw_buckets".into(),
            evidence: vec![format!("{tw} TIME_WAIT sockets now, limit {max}")],
            data: json!({"time_wait": tw, "max_tw_buckets": max}),
            remedy: "When the limit is reached the kernel closes without TIME_WAIT. Reduce the \
                     churn at its source (`twtrace report`), or raise net.ipv4.tcp_max_tw_buckets."
                .into(),
        });
    }
    if let Some(max) = s.max_tw_buckets
        && max < 4096
    {
        out.push(Finding {
            severity: Severity::Warning,
            kind: "tiny_max_tw_buckets",
            title: format!("net.ipv4.tcp_max_tw_buckets is only {max}"),
            evidence: vec![format!("tcp_max_tw_buckets = {max}")],
            data: json!({"max_tw_buckets": max}),
            remedy: "A small limit hides TIME_WAIT by skipping it, trading a visible number for \
                     silent corruption risk. Put it back near its default (half the \
                     established hash size) and reduce the churn instead."
                .into(),
        });
    }

    for srv in &ev.servers {
        let rate = if ev.duration_s > 0.0 {
            srv.births as f64 / ev.duration_s
        } else {
            0.0
        };
        let severity = if srv.in_time_wait >= 5000 || rate >= 100.0 {
            Severity::Warning
        } else if srv.births > 0 || srv.in_time_wait >= 100 {
            Severity::Info
        } else {
            continue;
        };
        out.push(Finding {
            severity,
            kind: "server_closes_first",
            title: format!("this server closes first on port {}", srv.port),
            evidence: vec![format!(
                "{} TIME_WAIT held on port {}, {:.1} new ones/s",
                srv.in_time_wait, srv.port, rate
            )],
            data: json!({"port": srv.port, "in_time_wait": srv.in_time_wait, "births": srv.births, "rate_per_s": round1(rate)}),
            remedy: "The side that closes first keeps the TIME_WAIT. Let clients close (keep-alive \
                     with a client-side idle timeout, or wait for the client's FIN after the \
                     response) so that the cost is spread over the clients instead of piling up \
                     on the server."
                .into(),
        });
    }

    for end in &ev.close_wait_end {
        let start = ev
            .close_wait_start
            .iter()
            .find(|c| {
                c.pid == end.pid && c.comm == end.comm && c.listener_port == end.listener_port
            })
            .map_or(0, |c| c.sockets);
        let grew = end.sockets.saturating_sub(start);
        let severity = if grew >= 10 || end.sockets >= 100 {
            Severity::Warning
        } else {
            Severity::Info
        };
        let who = if end.pid == 0 {
            end.comm.clone()
        } else {
            format!("{}[{}]", end.comm, end.pid)
        };
        let data = json!({
            "pid": end.pid,
            "comm": end.comm,
            "sockets": end.sockets,
            "at_start": start,
            "grew": grew,
            "listener_port": end.listener_port,
        });
        let change = format!(
            "{} at the end, {start} at the start (grew by {grew} in {:.0} s)",
            end.sockets, ev.duration_s
        );
        out.push(match end.listener_port {
            // Never accepted: the children of a listener whose process stopped calling
            // accept() (inet_diag lists them with inode 0, on the listener's port).
            Some(port) => Finding {
                severity,
                kind: "close_wait",
                title: format!("{who} is not accepting connections on port {port}"),
                evidence: vec![format!(
                    "{} connections wait in the accept queue of its listener on port {port}, \
                     closed by their clients before it accepted them (CLOSE_WAIT): {change}",
                    end.sockets
                )],
                data,
                remedy: "The listener's backlog fills while the process does not call accept(): \
                         it is blocked, overloaded or no longer serving that port. This is not a \
                         missing close(): find why it stopped accepting (a stuck accept loop, a \
                         worker pool that is full), or stop listening on the port it does not \
                         serve."
                    .into(),
            },
            None => Finding {
                severity,
                kind: "close_wait",
                title: format!("{who} holds {} CLOSE_WAIT sockets", end.sockets),
                evidence: vec![format!("{who}: {change}")],
                data,
                remedy: "Its peers closed these connections and it never called close() on them: \
                         a leak in the application (an error path that forgets to close, a pool \
                         that never evicts dead connections). Each holds a socket and a file \
                         descriptor until the process exits."
                    .into(),
            },
        });
    }

    if let Some(v) = s.tw_recycle {
        out.push(Finding {
            severity: Severity::Warning,
            kind: "tw_recycle",
            title: "net.ipv4.tcp_tw_recycle exists on this kernel".into(),
            evidence: vec![format!("tcp_tw_recycle = {v}")],
            data: json!({"tcp_tw_recycle": v}),
            remedy: "It drops connections from clients behind NAT and was removed in Linux \
                     4.12; keep it at 0 and use tcp_tw_reuse for outgoing connections."
                .into(),
        });
    }
    if s.timestamps == Some(0) {
        out.push(Finding {
            severity: Severity::Info,
            kind: "timestamps_off",
            title: "TCP timestamps are off".into(),
            evidence: vec!["net.ipv4.tcp_timestamps = 0".into()],
            data: json!({"tcp_timestamps": 0}),
            remedy: "tcp_tw_reuse needs timestamps to reuse a TIME_WAIT safely; with them off \
                     it does nothing."
                .into(),
        });
    }
    if ev.resets_on_close > 0 {
        out.push(Finding {
            severity: Severity::Info,
            kind: "reset_on_close",
            title: "connections closed by a reset instead of a FIN".into(),
            evidence: vec![format!(
                "{} in {:.0} s: {} closed with SO_LINGER set to zero or got data after shutting \
                 down (TcpExt TCPAbortOnData), {} closed with received data unread \
                 (TCPAbortOnClose)",
                ev.resets_on_close,
                ev.duration_s,
                ev.counters.abort_on_data,
                ev.counters.abort_on_close
            )],
            data: json!({"resets": ev.resets_on_close}),
            remedy:
                "A zero linger avoids TIME_WAIT by aborting: the peer gets an error instead of \
                     an orderly end and late segments are no longer guarded. Prefer reusing \
                     connections, or letting the peer close first."
                    .into(),
        });
    }

    if let Some((inode, name)) = &ev.netns {
        for f in &mut out {
            f.title.push_str(&format!(" (netns {name})"));
            if let Value::Object(m) = &mut f.data {
                m.insert("netns".into(), json!({"inode": inode, "name": name}));
            }
        }
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Evidence {
        Evidence {
            duration_s: 10.0,
            settings: Settings {
                tw_reuse: Some(2),
                max_tw_buckets: Some(131072),
                port_range: Some((40000, 40999)),
                timestamps: Some(1),
                fin_timeout: Some(60),
                ..Settings::default()
            },
            sockstat_tw: Some(10),
            ..Evidence::default()
        }
    }

    fn dest(held: u64, births: u64) -> Destination {
        Destination {
            allocation: Allocation::Connect,
            source: "10.0.0.1".parse().unwrap(),
            remote: Some("10.0.0.2:6379".parse().unwrap()),
            held,
            in_time_wait: held,
            births,
            no_port: 0,
            active_s: 0.0,
            failing: Vec::new(),
        }
    }

    #[test]
    fn a_quiet_host_has_nothing_serious() {
        let mut ev = base();
        ev.destinations.push(dest(3, 3));
        let f = diagnose(&ev);
        assert!(f.iter().all(|f| !f.severity.serious()), "{f:?}");
    }

    #[test]
    fn port_exhaustion_with_its_numbers() {
        let mut ev = base();
        // 50/s for 10 s: 500 held of 1000, 3000 at steady state, 10 s left.
        ev.destinations.push(dest(500, 500));
        let f = diagnose(&ev);
        let p = &f[0];
        assert_eq!(p.kind, "port_exhaustion");
        assert_eq!(p.severity, Severity::Critical);
        assert_eq!(p.data["usable_ports"], 1000);
        assert_eq!(p.data["rate_per_s"], 50.0);
        assert_eq!(p.data["steady_state"], 3000.0);
        assert_eq!(p.data["time_left_s"], 10.0);
        assert_eq!(p.data["tw_reuse_applies"], false, "not loopback");
        assert!(p.remedy.contains("tcp_tw_reuse=1"));
        assert!(p.title.contains("10.0.0.1 -> 10.0.0.2:6379"));
        // Half of it at steady state, nothing held yet: a warning, not critical.
        let mut ev = base();
        ev.destinations.push(dest(10, 85));
        assert_eq!(diagnose(&ev)[0].severity, Severity::Warning);
    }

    /// A full range towards a loopback destination with tcp_tw_reuse=2 is recycled, not
    /// exhausted (field case 06): 99 connections/s need 99 ports, no failure is predicted.
    #[test]
    fn loopback_reuse_recycles_the_range() {
        let mut ev = base();
        ev.counters.recycled = 640;
        ev.destinations.push(Destination {
            remote: Some("127.0.0.1:8080".parse().unwrap()),
            ..dest(990, 990)
        });
        let p = &diagnose(&ev)[0];
        assert_eq!(p.data["tw_reuse_applies"], true);
        assert_eq!(p.data["steady_state"], 99.0);
        assert!(p.data["time_left_s"].is_null());
        assert_eq!(p.severity, Severity::Info);
        assert!(
            p.evidence
                .iter()
                .any(|e| e.contains("TWRecycled rose by 640")),
            "{:?}",
            p.evidence
        );
    }

    /// connect() already failing for lack of a port: critical, with who and how often.
    #[test]
    fn failures_that_happened_are_evidence() {
        let mut ev = base();
        ev.destinations.push(Destination {
            no_port: 312,
            failing: vec![(4121, "api".into(), 300), (4130, "worker".into(), 12)],
            ..dest(1000, 400)
        });
        let p = &diagnose(&ev)[0];
        assert_eq!(p.severity, Severity::Critical);
        assert_eq!(p.data["no_port_failures"], 312);
        assert_eq!(p.data["time_left_s"], 0.0);
        assert!(
            p.evidence.iter().any(|e| e
                == "already failing: 312 connect() calls found no local port in 10 s \
                    (EADDRNOTAVAIL), from api[4121] 300, worker[4130] 12"),
            "{:?}",
            p.evidence
        );
    }

    /// bind() before connect(): one pool for the source address, across destinations, no
    /// reuse; the remedy names IP_BIND_ADDRESS_NO_PORT (field case 16).
    #[test]
    fn bind_before_connect_is_judged_per_source() {
        let mut ev = base();
        ev.duration_s = 30.0;
        ev.settings.port_range = Some((40000, 40299));
        ev.destinations.push(Destination {
            allocation: Allocation::Bind,
            remote: None,
            ..dest(240, 240)
        });
        let p = &diagnose(&ev)[0];
        assert_eq!(p.severity, Severity::Critical);
        assert_eq!(p.data["allocation"], "bind");
        assert_eq!(p.data["usable_ports"], 300);
        assert_eq!(p.data["time_left_s"], 8.0, "(300 - 240) / 8 per s, rounded");
        assert!(p.data["destination"].is_null());
        assert!(p.remedy.contains("IP_BIND_ADDRESS_NO_PORT"));
        assert!(p.evidence.iter().any(|e| e.contains("EADDRINUSE")));
    }

    #[test]
    fn overflow_close_wait_and_settings() {
        let mut ev = base();
        ev.counters.overflow = 3;
        ev.settings.max_tw_buckets = Some(2);
        ev.settings.tw_recycle = Some(1);
        ev.resets_on_close = 4;
        ev.close_wait_start = vec![CloseWait {
            netns: 1,
            pid: 7,
            comm: "leaky".into(),
            sockets: 2,
            listener_port: None,
        }];
        ev.close_wait_end = vec![CloseWait {
            netns: 1,
            pid: 7,
            comm: "leaky".into(),
            sockets: 20,
            listener_port: None,
        }];
        ev.servers.push(ServerPort {
            port: 443,
            in_time_wait: 6000,
            births: 10,
        });
        let f = diagnose(&ev);
        let kinds: Vec<&str> = f.iter().map(|f| f.kind).collect();
        assert_eq!(kinds[0], "tw_overflow");
        for k in [
            "tiny_max_tw_buckets",
            "close_wait",
            "tw_recycle",
            "reset_on_close",
            "server_closes_first",
        ] {
            assert!(kinds.contains(&k), "{k} in {kinds:?}");
        }
        let cw = f.iter().find(|f| f.kind == "close_wait").unwrap();
        assert_eq!(cw.severity, Severity::Warning);
        assert!(cw.title.contains("leaky[7] holds 20"));
        assert_eq!(cw.data["grew"], 18);
        // Ranked: critical first, info last.
        assert!(f.windows(2).all(|w| w[0].severity >= w[1].severity));
    }
}
