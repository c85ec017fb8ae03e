//! A model of the kernel's local port allocator, per network namespace: how many local ports a
//! client can get, how many it needs at the rate it takes them, and when it runs out. Pure:
//! fed what was measured, unit-tested with numbers.
//!
//! What it models (net/ipv4/inet_hashtables.c `__inet_hash_connect`,
//! net/ipv4/inet_connection_sock.c `inet_csk_find_open_port`, net/ipv4/tcp_ipv4.c
//! `tcp_twsk_unique`):
//!
//! * **connect() without bind()** picks a port for the whole 4-tuple: one (source address,
//!   destination) can hold as many sockets, TIME_WAIT included, as there are usable ports
//!   (`ip_local_port_range` minus `ip_local_reserved_ports`); other destinations do not compete.
//!   Where `tcp_tw_reuse` applies (1, or 2 towards a loopback address; TCP timestamps on),
//!   connect() takes over a TIME_WAIT of the same 4-tuple whose last timestamp is older than
//!   `tcp_tw_reuse_delay` (one second where the kernel has no such sysctl): only the sockets
//!   of the last second, and those still open, keep their ports.
//! * **bind() before connect()** (a local port already set at `CLOSE -> SYN_SENT`) picks the
//!   port at bind(), which must be free for that source address whatever the destination, and a
//!   TIME_WAIT keeps it (tcp_tw_reuse does not apply to bind()): the range is shared by every
//!   connection from that address. IP_BIND_ADDRESS_NO_PORT defers the choice to connect().
//! * The kernel prefers even ports for connect() and odd ones for bind() but takes the other
//!   half when one is used up: both draw on the whole range.

use std::net::{IpAddr, SocketAddr};

use crate::host::settings::Settings;

/// TIME_WAIT lasts this long (TCP_TIMEWAIT_LEN; not tunable).
pub const TIME_WAIT_S: f64 = 60.0;

/// How the ports of a demand are allocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allocation {
    /// connect() without bind(): per (source address, destination).
    Connect,
    /// bind() before connect(): per source address, across destinations.
    Bind,
}

/// What one client takes, measured: towards one destination from one source address (connect),
/// or from one source address (bind).
#[derive(Clone, Debug, PartialEq)]
pub struct Demand {
    pub allocation: Allocation,
    pub source: IpAddr,
    /// None for `Bind`: every destination.
    pub remote: Option<SocketAddr>,
    /// Sockets holding a local port in that scope now, in any state.
    pub held: u64,
    /// Of those, in TIME_WAIT (either substate).
    pub in_time_wait: u64,
    /// New connections closed first by this host while watched.
    pub births: u64,
    /// connect() calls that found no local port while watched (EADDRNOTAVAIL).
    pub no_port: u64,
}

impl Demand {
    /// Sockets still open (not in TIME_WAIT).
    pub fn open(&self) -> u64 {
        self.held.saturating_sub(self.in_time_wait)
    }
}

/// Whether connect() may take over this destination's TIME_WAIT, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Reuse {
    pub applies: bool,
    /// How old a TIME_WAIT must be to be taken over (ms).
    pub delay_ms: u64,
    /// The settings that decide it, for a person.
    pub why: String,
}

/// `tcp_tw_reuse` for a connect() towards `remote` (net/ipv4/tcp_ipv4.c `tcp_twsk_unique`:
/// mode 2 is loopback only, and the TIME_WAIT must carry a timestamp).
pub fn reuse(settings: &Settings, allocation: Allocation, remote: Option<SocketAddr>) -> Reuse {
    let delay_ms = settings.tw_reuse_delay_ms.map_or(1000, u64::from);
    let mode = settings.tw_reuse.unwrap_or(0);
    let timestamps = settings.timestamps.unwrap_or(1) != 0;
    let loopback = remote.is_some_and(|r| r.ip().is_loopback());
    let (applies, why) = match (allocation, mode) {
        (Allocation::Bind, _) => (
            false,
            "bind() picks its port before any destination is known: tcp_tw_reuse does not apply"
                .to_owned(),
        ),
        (_, 0) => (false, "tcp_tw_reuse=0".to_owned()),
        (_, 2) if !loopback => (
            false,
            "tcp_tw_reuse=2 applies to loopback destinations only".to_owned(),
        ),
        (_, m) if !timestamps => (
            false,
            format!("tcp_tw_reuse={m}, but tcp_timestamps=0: reuse needs timestamps"),
        ),
        (_, m) => (
            true,
            format!(
                "tcp_tw_reuse={m}{} with tcp_timestamps on: connect() takes over a TIME_WAIT \
                 older than {delay_ms} ms{}",
                if m == 2 { " (loopback)" } else { "" },
                if settings.tw_reuse_delay_ms.is_some() {
                    " (tcp_tw_reuse_delay)"
                } else {
                    ""
                }
            ),
        ),
    };
    Reuse {
        applies,
        delay_ms,
        why,
    }
}

/// The model's answer for one demand.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// New connections per second.
    pub rate: f64,
    pub usable: u32,
    /// Ports it holds at steady state at this rate: the open ones, plus every TIME_WAIT of the
    /// last 60 s, or with reuse only those younger than the reuse delay.
    pub needed: f64,
    /// Seconds until a connect() (or bind()) finds no port, when the rate leads there; 0: it
    /// already does.
    pub time_left_s: Option<f64>,
    pub reuse: Reuse,
}

impl Verdict {
    /// The share of the usable ports held at steady state.
    pub fn needed_share(&self) -> f64 {
        self.needed / self.usable.max(1) as f64
    }
}

/// The seconds over which a pool's births give its rate: from about one gap between births
/// before its first one (the traffic may have started while doctor watched: a load test
/// started after doctor would otherwise look slower than it is, and its failure later) to the
/// window's end; at least half the window, so that a burst near the end is not taken for a
/// steady rate (at most twice the window's average), and never more than the window.
/// `first_ns`, `last_ns`: the pool's first and last birth, in the window's clock (ns).
pub fn active_s(window: (u64, u64), births: u64, first_ns: u64, last_ns: u64) -> f64 {
    let (start, end) = window;
    let whole = end.saturating_sub(start) as f64 / 1e9;
    if births < 2 || whole <= 0.0 {
        return whole;
    }
    let gap = last_ns.saturating_sub(first_ns) / (births - 1);
    let began = first_ns.saturating_sub(gap).max(start);
    (end.saturating_sub(began) as f64 / 1e9).clamp(whole / 2.0, whole)
}

pub fn judge(d: &Demand, usable: u32, duration_s: f64, reuse: Reuse) -> Verdict {
    let rate = if duration_s > 0.0 {
        d.births as f64 / duration_s
    } else {
        0.0
    };
    let usable_f = usable as f64;
    let open = d.open() as f64;
    let (needed, time_left_s) = if reuse.applies {
        // Only the TIME_WAIT younger than the delay keep their ports.
        let window = reuse.delay_ms as f64 / 1000.0;
        let needed = open + rate * window;
        let left = (needed > usable_f).then_some(0.0);
        (needed, left)
    } else {
        // Every TIME_WAIT keeps its port for 60 s: held grows by `rate` until it reaches the
        // steady state, or the range.
        let needed = open + rate * TIME_WAIT_S;
        let left =
            (needed > usable_f && rate > 0.0).then(|| ((usable_f - d.held as f64) / rate).max(0.0));
        (needed, left)
    };
    let time_left_s = if d.no_port > 0 {
        Some(0.0)
    } else {
        time_left_s
    };
    Verdict {
        rate,
        usable,
        needed,
        time_left_s,
        reuse,
    }
}

/// `1000 = ip_local_port_range 40000-40999 (1000) - 0 reserved`: the usable ports and where
/// they come from.
pub fn usable_line(settings: &Settings) -> Option<(u32, String)> {
    let (lo, hi) = settings.port_range?;
    let usable = settings.ephemeral_ports()?;
    let range = if hi >= lo { (hi - lo) as u32 + 1 } else { 0 };
    Some((
        usable,
        format!(
            "{usable} usable = ip_local_port_range {lo}-{hi} ({range}) - {} in ip_local_reserved_ports",
            range - usable
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// Traffic that ran all along counts over the whole window; traffic that began inside it
    /// counts from about one gap before its first birth; a burst at the end over half the
    /// window.
    #[test]
    fn a_pools_rate_counts_from_when_its_traffic_began() {
        let w = (100 * S, 105 * S);
        // 10/s all along: first birth 0.1 s in, last 0.1 s before the end.
        let all = active_s(w, 50, 100 * S + S / 10, 104 * S + 9 * S / 10);
        assert_eq!(format!("{all:.2}"), "5.00");
        // 10/s from 1.5 s in: 35 births from 101.5 to 104.9.
        let a = active_s(w, 35, 101 * S + S / 2, 104 * S + 9 * S / 10);
        assert_eq!(format!("{a:.2}"), "3.60");
        assert_eq!(format!("{:.2}", 35.0 / a), "9.72");
        // 10 births in the last 0.1 s: half the window.
        assert_eq!(active_s(w, 10, 104 * S + 9 * S / 10, 105 * S), 2.5);
        // One birth, or none: the whole window.
        assert_eq!(active_s(w, 1, 104 * S, 104 * S), 5.0);
        assert_eq!(active_s(w, 0, 0, 0), 5.0);
    }

    fn settings(reuse: u32, range: (u16, u16)) -> Settings {
        Settings {
            tw_reuse: Some(reuse),
            port_range: Some(range),
            timestamps: Some(1),
            ..Settings::default()
        }
    }

    fn demand(allocation: Allocation, held: u64, tw: u64, births: u64) -> Demand {
        Demand {
            allocation,
            source: "127.0.0.1".parse().unwrap(),
            remote: Some("127.0.0.2:6380".parse().unwrap()),
            held,
            in_time_wait: tw,
            births,
            no_port: 0,
        }
    }

    /// The README's own example (field case 06): 60 connections/s to a loopback destination,
    /// 1,000 ports, tcp_tw_reuse=2: connect() recycles TIME_WAIT older than a second, so about
    /// 60 ports are ever needed: no failure.
    #[test]
    fn reuse_on_loopback_needs_a_second_of_ports() {
        let s = settings(2, (40000, 40999));
        let d = demand(Allocation::Connect, 1000, 998, 480);
        let r = reuse(&s, Allocation::Connect, d.remote);
        assert!(r.applies, "{}", r.why);
        let v = judge(&d, 1000, 8.0, r);
        assert_eq!(v.rate, 60.0);
        assert_eq!(v.needed, 2.0 + 60.0);
        assert_eq!(v.time_left_s, None);
        // Without reuse the same traffic runs out: (1000 - 300 held) / 60 per s.
        let s0 = settings(0, (40000, 40999));
        let d = demand(Allocation::Connect, 300, 300, 480);
        let v = judge(&d, 1000, 8.0, reuse(&s0, Allocation::Connect, d.remote));
        assert_eq!(v.needed, 3600.0);
        assert!((v.time_left_s.unwrap() - 700.0 / 60.0).abs() < 1e-9);
    }

    #[test]
    fn reuse_needs_loopback_for_mode_2_timestamps_and_no_bind() {
        let remote = Some("10.0.0.2:80".parse().unwrap());
        assert!(!reuse(&settings(2, (1, 2)), Allocation::Connect, remote).applies);
        assert!(reuse(&settings(1, (1, 2)), Allocation::Connect, remote).applies);
        let mut s = settings(1, (1, 2));
        s.timestamps = Some(0);
        let r = reuse(&s, Allocation::Connect, remote);
        assert!(
            !r.applies && r.why.contains("tcp_timestamps=0"),
            "{}",
            r.why
        );
        assert!(!reuse(&settings(1, (1, 2)), Allocation::Bind, None).applies);
        s.timestamps = Some(1);
        s.tw_reuse_delay_ms = Some(200);
        let r = reuse(&s, Allocation::Connect, remote);
        assert_eq!(r.delay_ms, 200);
        assert!(r.why.contains("200 ms (tcp_tw_reuse_delay)"), "{}", r.why);
    }

    /// Field case 16: a client binding its source address (port 0) before each connect(), 8
    /// connections/s to 8 destinations, 300 ports: the range is per source address, TIME_WAIT
    /// keeps the port, reuse does not apply: 240 held after 30 s, 7.5 s left.
    #[test]
    fn bind_before_connect_shares_the_range_across_destinations() {
        let s = settings(2, (40000, 40299));
        let d = Demand {
            allocation: Allocation::Bind,
            remote: None,
            ..demand(Allocation::Bind, 240, 240, 240)
        };
        let v = judge(&d, 300, 30.0, reuse(&s, Allocation::Bind, None));
        assert_eq!(v.rate, 8.0);
        assert_eq!(v.needed, 480.0);
        assert_eq!(v.time_left_s, Some(7.5));
    }

    #[test]
    fn failures_seen_mean_no_time_left() {
        let s = settings(0, (40000, 40999));
        let mut d = demand(Allocation::Connect, 10, 10, 10);
        d.no_port = 3;
        let v = judge(&d, 1000, 10.0, reuse(&s, Allocation::Connect, d.remote));
        assert_eq!(v.time_left_s, Some(0.0));
    }

    #[test]
    fn usable_ports_show_their_arithmetic() {
        let mut s = settings(0, (40000, 40999));
        s.reserved_ports = vec![(40000, 40009), (50000, 50000)];
        let (n, line) = usable_line(&s).unwrap();
        assert_eq!(n, 990);
        assert_eq!(
            line,
            "990 usable = ip_local_port_range 40000-40999 (1000) - 10 in ip_local_reserved_ports"
        );
    }
}
