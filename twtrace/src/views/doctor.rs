//! `twtrace doctor`: reads the settings and counters that govern TIME_WAIT, watches the
//! traffic for a while, and says what is wrong and what to change. Exit code 1 when a finding
//! is serious, so that scripts can use it.

use std::{
    collections::{HashMap, HashSet},
    io::Write,
    net::{IpAddr, SocketAddr},
};

use serde_json::json;

use crate::{
    cli::DoctorArgs,
    failure::ExitWith,
    host,
    host::sockdiag::{self, state},
    kernel::decode::Role,
    present::diagnose::{self, Destination, Evidence, ServerPort},
    track::lifecycle::Event,
    track::session::{self, Session},
};

/// Births seen while watching, by what they tell about ports.
#[derive(Default)]
struct Births {
    /// Outgoing: (source address, destination).
    outgoing: HashMap<(IpAddr, SocketAddr), u64>,
    /// Accepted: the listening port.
    accepted: HashMap<u16, u64>,
}

impl Births {
    fn feed(&mut self, ev: &Event, listening: &HashSet<u16>) {
        let Event::Enter(e) = ev else { return };
        if e.seeded {
            return;
        }
        let accepted = match e.role {
            Role::Accepted => true,
            Role::Connected => false,
            Role::Unknown => listening.contains(&e.conn.local.port()),
        };
        if accepted {
            *self.accepted.entry(e.conn.local.port()).or_default() += 1;
        } else {
            *self
                .outgoing
                .entry((e.conn.local.ip(), e.conn.remote))
                .or_default() += 1;
        }
    }
}

/// Every socket holding a port now (sock_diag), joined with the births.
fn evidence_from_sockets(
    births: &Births,
    listening: &HashSet<u16>,
) -> (Vec<Destination>, Vec<ServerPort>) {
    let all: Vec<u8> = (1..=11).filter(|&s| s != state::LISTEN).collect();
    let sockets = sockdiag::dump(&all).unwrap_or_default();
    let mut dests: HashMap<(IpAddr, SocketAddr), Destination> = HashMap::new();
    let mut servers: HashMap<u16, ServerPort> = HashMap::new();
    let dest = |m: &mut HashMap<(IpAddr, SocketAddr), Destination>, k: (IpAddr, SocketAddr)| {
        m.entry(k)
            .or_insert_with(|| Destination {
                source: k.0,
                remote: k.1,
                held: 0,
                in_time_wait: 0,
                births: 0,
            })
            .clone()
    };
    for s in &sockets {
        let tw = s.state == state::TIME_WAIT;
        if listening.contains(&s.conn.local.port()) {
            let e = servers.entry(s.conn.local.port()).or_insert(ServerPort {
                port: s.conn.local.port(),
                in_time_wait: 0,
                births: 0,
            });
            e.in_time_wait += tw as u64;
        } else {
            let k = (s.conn.local.ip(), s.conn.remote);
            let mut d = dest(&mut dests, k);
            d.held += 1;
            d.in_time_wait += tw as u64;
            dests.insert(k, d);
        }
    }
    for (&k, &n) in &births.outgoing {
        let mut d = dest(&mut dests, k);
        d.births = n;
        dests.insert(k, d);
    }
    for (&port, &n) in &births.accepted {
        servers
            .entry(port)
            .or_insert(ServerPort {
                port,
                in_time_wait: 0,
                births: 0,
            })
            .births = n;
    }
    (
        dests.into_values().collect(),
        servers.into_values().collect(),
    )
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

pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let counters_start = host::counters::tw_counters();
    let close_wait_start = host::close_wait::close_wait_by_process();
    let mut session = Session::start(args.probe.options(), false)?;
    let listening = sockdiag::listening_ports().unwrap_or_default();
    eprintln!(
        "twtrace: watching for {}s; Ctrl-C to stop early",
        args.duration.as_secs_f64()
    );
    let started = std::time::Instant::now();
    let mut births = Births::default();
    let stop = session::stop_signal(Some(args.duration));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = &mut stop => { r?; break; }
            r = session.next() => {
                for ev in r? {
                    births.feed(ev, &listening);
                }
            }
        }
    }
    for ev in session.finish() {
        births.feed(ev, &listening);
    }
    let duration_s = started.elapsed().as_secs_f64();
    let counters = host::counters::tw_counters().since(&counters_start);
    let (destinations, servers) = evidence_from_sockets(&births, &listening);
    let evidence = Evidence {
        duration_s,
        settings: host::settings::settings(),
        counters,
        resets_on_close: counters.abort_on_data,
        sockstat_tw: host::counters::sockstat_tw(),
        destinations,
        servers,
        close_wait_start,
        close_wait_end: host::close_wait::close_wait_by_process(),
    };
    let findings = diagnose::diagnose(&evidence);
    let loss = session.loss();
    let serious = findings.iter().filter(|f| f.severity.serious()).count();
    let mut out = std::io::stdout().lock();
    if args.json {
        let s = &evidence.settings;
        let doc = json!({
            "duration_s": (duration_s * 10.0).round() / 10.0,
            "serious": serious,
            "settings": {
                "tcp_tw_reuse": s.tw_reuse,
                "tcp_max_tw_buckets": s.max_tw_buckets,
                "ip_local_port_range": s.port_range.map(|(a, b)| vec![a, b]),
                "ip_local_reserved_ports": s.reserved_ports.iter().map(|&(a, b)| vec![a, b]).collect::<Vec<_>>(),
                "ephemeral_ports": s.ephemeral_ports(),
                "tcp_fin_timeout": s.fin_timeout,
                "tcp_timestamps": s.timestamps,
                "tcp_tw_recycle": s.tw_recycle,
            },
            "counters": {
                "tw_created": counters.created,
                "tw_killed": counters.killed,
                "tw_recycled": counters.recycled,
                "tw_overflow": counters.overflow,
                "abort_on_data": counters.abort_on_data,
                "time_wait_now": evidence.sockstat_tw,
            },
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
            "twtrace doctor: watched {duration_s:.0} s; {} finding(s), {serious} serious",
            findings.len()
        )?;
        if loss.total() > 0 {
            writeln!(out, "(incomplete: {})", session::loss_line(&loss))?;
        }
        for f in &findings {
            writeln!(
                out,
                "\n{:<8} {}",
                f.severity.as_str().to_uppercase(),
                f.title
            )?;
            for e in &f.evidence {
                for line in wrap(e, 80 - 9) {
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
    session.write_stats(args.probe.stats_json.as_deref())?;
    if serious > 0 {
        return Err(ExitWith(1).into());
    }
    Ok(())
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
