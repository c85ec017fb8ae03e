//! `twtrace watch`: every TIME_WAIT birth and death as it happens, as text or JSON lines.

use std::{
    io::{self, Write},
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    cli::WatchArgs,
    host::clock::{WallClock, hms_millis, jiffies_to_ms},
    host::netns::{self, Registry},
    kernel::decode::Role,
    kernel::probes::ProbeOptions,
    track::filter::Filter,
    track::lifecycle::{Event, FailReason, Substate, TIME_WAIT_MS},
    track::session::{self, Session},
};

/// Kernel names of TCP states (include/net/tcp_states.h), as `ss` and the kernel print them.
pub fn state_name(state: u8) -> &'static str {
    match state {
        1 => "ESTABLISHED",
        2 => "SYN_SENT",
        3 => "SYN_RECV",
        4 => "FIN_WAIT1",
        5 => "FIN_WAIT2",
        6 => "TIME_WAIT",
        7 => "CLOSE",
        8 => "CLOSE_WAIT",
        9 => "LAST_ACK",
        10 => "LISTEN",
        11 => "CLOSING",
        12 => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

/// How the views render one event.
pub struct Renderer {
    pub wall: WallClock,
    /// CONFIG_HZ, to show the kernel's timeout; None leaves it out.
    pub hz: Option<u32>,
    /// When the host has several network namespaces: the one to leave unnamed (twtrace's own),
    /// and the names of the others; each text line from another namespace ends with
    /// `netns=NAME`. None: one namespace, nothing to say.
    pub netns: Option<(u32, Registry)>,
}

fn role_short(role: Role) -> &'static str {
    match role {
        Role::Connected => "out",
        Role::Accepted => "in",
        Role::Unknown => "?",
    }
}

fn secs(ns: u64) -> String {
    format!("{:.2}s", ns as f64 / 1e9)
}

impl Renderer {
    pub const HEADER: &'static str =
        "TIME         EVENT     PID COMM            LOCAL > REMOTE (ROLE) DETAIL";

    pub fn text(&mut self, ev: &Event) -> String {
        let for_ms = |jiffies| {
            jiffies_to_ms(jiffies, self.hz)
                .map(|ms| secs(ms * 1_000_000))
                .unwrap_or_default()
        };
        let (name, detail) = match ev {
            Event::Enter(e) => (
                "ENTER",
                match e.substate {
                    Substate::TimeWait => jiffies_to_ms(e.timeout_jiffies, self.hz)
                        .map(|ms| format!("for {}", secs(ms * 1_000_000)))
                        .unwrap_or_default(),
                    Substate::FinWait2 => format!(
                        "FIN_WAIT2: waits {} for the peer's FIN, then {} in TIME_WAIT",
                        for_ms(e.timeout_jiffies),
                        secs(TIME_WAIT_MS * 1_000_000)
                    ),
                },
            ),
            Event::Exit(e) => (
                "EXIT",
                match (e.lifetime_ns, e.substate) {
                    (Some(ns), Substate::TimeWait) => {
                        format!("{} after {}", e.reason.as_str(), secs(ns))
                    }
                    (Some(ns), Substate::FinWait2) => format!(
                        "{} after {} in FIN_WAIT2 (no FIN from the peer)",
                        e.reason.as_str(),
                        secs(ns)
                    ),
                    (None, _) => format!("{} (born before start)", e.reason.as_str()),
                },
            ),
            Event::Rearm(r) => (
                "REARM",
                format!(
                    "{} > {} for {}",
                    r.from.as_str(),
                    r.to.as_str(),
                    for_ms(r.timeout_jiffies)
                ),
            ),
            Event::ConnectFail(f) => (
                "FAIL",
                match f.reason {
                    FailReason::NoPort => "connect: no local port free (EADDRNOTAVAIL)".into(),
                    r => format!("connect: {} ({})", r.as_str(), r.errno()),
                },
            ),
            Event::State(e) => (
                "STATE",
                format!("{} > {}", state_name(e.old_state), state_name(e.new_state)),
            ),
        };
        let (pid, comm) = match ev.owner() {
            Some(p) => (p.pid.to_string(), p.comm.as_str()),
            None => ("-".to_owned(), "-"),
        };
        let conn = match ev.conn() {
            Some(c) => format!("{} > {}", c.local, c.remote),
            None => "? > ?".to_owned(),
        };
        let place = match &mut self.netns {
            Some((own, names)) if ev.netns() != *own && ev.netns() != 0 => {
                format!(" netns={}", names.label(ev.netns()))
            }
            _ => String::new(),
        };
        format!(
            "{} {:<5} {:>7} {:<15} {} ({}) {}{place}",
            hms_millis(self.wall.epoch_ns(ev.ts_ns())),
            name,
            pid,
            comm,
            conn,
            role_short(ev.role()),
            detail
        )
        .trim_end()
        .to_owned()
    }

    /// The JSON line of an event, serialized straight to the output (no map built per event).
    pub fn json<'a>(&self, ev: &'a Event) -> JsonLine<'a> {
        let (event, detail) = match ev {
            Event::Enter(e) => {
                let timer_ms = jiffies_to_ms(e.timeout_jiffies, self.hz);
                (
                    "tw_enter",
                    match e.substate {
                        Substate::TimeWait => Detail::Enter {
                            substate: e.substate.as_str(),
                            timeout_ms: timer_ms,
                            fin_wait2_timeout_ms: None,
                            bound: e.bound,
                        },
                        // What TIME_WAIT will last once the peer's FIN comes (the kernel
                        // re-arms the timer for TCP_TIMEWAIT_LEN then), and how long it waits.
                        Substate::FinWait2 => Detail::Enter {
                            substate: e.substate.as_str(),
                            timeout_ms: Some(TIME_WAIT_MS),
                            fin_wait2_timeout_ms: timer_ms,
                            bound: e.bound,
                        },
                    },
                )
            }
            Event::Exit(e) => (
                "tw_exit",
                Detail::Exit {
                    reason: e.reason.as_str(),
                    lifetime_ms: e.lifetime_ns.map(|ns| ns / 1_000_000),
                    substate: e.substate.as_str(),
                },
            ),
            Event::Rearm(r) => (
                "tw_rearm",
                Detail::Rearm {
                    from: r.from.as_str(),
                    substate: r.to.as_str(),
                    timeout_ms: jiffies_to_ms(r.timeout_jiffies, self.hz),
                },
            ),
            Event::ConnectFail(f) => (
                "connect_fail",
                Detail::ConnectFail {
                    reason: f.reason.as_str(),
                    errno: f.reason.errno(),
                    bound: f.bound,
                },
            ),
            Event::State(e) => (
                "state",
                Detail::State {
                    old_state: state_name(e.old_state),
                    new_state: state_name(e.new_state),
                },
            ),
        };
        let (conn, owner) = (ev.conn(), ev.owner());
        JsonLine {
            event,
            ts_ns: self.wall.epoch_ns(ev.ts_ns()),
            family: conn.map(|c| c.family()),
            local_addr: conn.map(|c| c.local.ip()),
            local_port: conn.map(|c| c.local.port()),
            remote_addr: conn.map(|c| c.remote.ip()),
            remote_port: conn.map(|c| c.remote.port()),
            role: ev.role().as_str(),
            pid: owner.map(|p| p.pid),
            tid: owner.map(|p| p.tid),
            comm: owner.map(|p| p.comm.as_str()),
            cgroup_id: owner.map(|p| p.cgroup_id),
            netns: Some(ev.netns()).filter(|&n| n != 0),
            detail,
        }
    }
}

/// One `watch --json` line. Every key is always present (null when unknown), plus the keys of
/// the event's kind.
#[derive(Serialize)]
pub struct JsonLine<'a> {
    event: &'static str,
    ts_ns: u64,
    family: Option<u8>,
    local_addr: Option<IpAddr>,
    local_port: Option<u16>,
    remote_addr: Option<IpAddr>,
    remote_port: Option<u16>,
    role: &'static str,
    pid: Option<u32>,
    tid: Option<u32>,
    comm: Option<&'a str>,
    cgroup_id: Option<u64>,
    /// Inode number of the network namespace (null when the kernel could not say).
    netns: Option<u32>,
    #[serde(flatten)]
    detail: Detail,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Detail {
    Enter {
        substate: &'static str,
        timeout_ms: Option<u64>,
        fin_wait2_timeout_ms: Option<u64>,
        /// The local port was bound before connect().
        bound: bool,
    },
    Exit {
        reason: &'static str,
        lifetime_ms: Option<u64>,
        substate: &'static str,
    },
    Rearm {
        from: &'static str,
        substate: &'static str,
        timeout_ms: Option<u64>,
    },
    ConnectFail {
        reason: &'static str,
        errno: &'static str,
        bound: bool,
    },
    State {
        old_state: &'static str,
        new_state: &'static str,
    },
}

pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    let filter: Filter = args.filter.to_filter();
    let mut session = Session::start(
        ProbeOptions {
            emit_states: args.all_states,
            ..args.probe.options()
        },
        false,
    )?;
    let several = session.host.namespaces.len() > 1;
    let mut renderer = Renderer {
        wall: session.wall,
        hz: session.hz,
        netns: netns::own()
            .filter(|_| several && !args.json)
            .map(|own| (own, Registry::new())),
    };
    let mut out = io::BufWriter::new(io::stdout().lock());
    if !args.json {
        writeln!(out, "{}", Renderer::HEADER)?;
        out.flush()?;
    }
    eprintln!("twtrace: tracing TIME_WAIT; Ctrl-C to stop");
    let stop = session::stop_signal(args.duration);
    tokio::pin!(stop);
    let mut open = true;
    loop {
        let events = tokio::select! {
            r = &mut stop => { r?; break; }
            r = session.next() => r?,
        };
        if !emit(&mut out, &mut renderer, &filter, args.json, events) {
            open = false;
            break;
        }
    }
    if open {
        let events = session.finish();
        emit(&mut out, &mut renderer, &filter, args.json, events);
    }
    let loss = session.loss();
    session.write_stats(args.probe.stats_json.as_deref())?;
    eprintln!("twtrace: {}", session.summary());
    eprintln!("twtrace: {}", session::loss_line(&loss));
    Ok(())
}

/// Writes the events that pass the filter; false once stdout is closed (a pipe reader left).
fn emit(
    out: &mut impl Write,
    r: &mut Renderer,
    filter: &Filter,
    json: bool,
    events: &[Event],
) -> bool {
    let mut write = || -> io::Result<()> {
        for ev in events.iter().filter(|e| filter.matches(e)) {
            if json {
                serde_json::to_writer(&mut *out, &r.json(ev))?;
                out.write_all(b"\n")?;
            } else {
                writeln!(out, "{}", r.text(ev))?;
            }
        }
        out.flush()
    };
    write().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        kernel::decode::{Conn, Process},
        track::lifecycle::{Reason, Transition, TwEnter, TwExit},
    };

    fn conn() -> Conn {
        Conn {
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "[::1]:80".parse().unwrap(),
        }
    }

    fn owner() -> Option<Process> {
        Some(Process {
            pid: 42,
            tid: 43,
            comm: "curl".into(),
            cgroup_id: 9,
        })
    }

    fn renderer(hz: Option<u32>) -> Renderer {
        Renderer {
            wall: WallClock::with_offset(1_000_000_000 * 3600),
            hz,
            netns: None,
        }
    }

    #[test]
    fn json_keys_of_each_event() {
        let r = renderer(Some(250));
        let enter = Event::Enter(TwEnter {
            netns: 0,
            ts_ns: 5,
            timer: 1,
            conn: conn(),
            owner: owner(),
            role: Role::Connected,
            timeout_jiffies: 15000,
            substate: crate::track::lifecycle::Substate::TimeWait,
            bound: false,
            seeded: false,
        });
        let v = serde_json::to_value(r.json(&enter)).unwrap();
        assert_eq!(v["event"], "tw_enter");
        assert_eq!(v["ts_ns"], 3_600_000_000_005u64);
        assert_eq!(v["local_addr"], "127.0.0.1");
        assert_eq!(v["local_port"], 40000);
        assert_eq!(v["remote_addr"], "::1");
        assert_eq!(v["remote_port"], 80);
        assert_eq!(v["family"], 4);
        assert_eq!(v["pid"], 42);
        assert_eq!(v["comm"], "curl");
        assert_eq!(v["role"], "connected");
        assert_eq!(v["timeout_ms"], 60000);

        let exit = Event::Exit(TwExit {
            netns: 0,
            ts_ns: 6,
            timer: 1,
            conn: Some(conn()),
            owner: None,
            role: Role::Unknown,
            reason: Reason::Syn,
            lifetime_ns: Some(1_500_000_000),
            substate: crate::track::lifecycle::Substate::TimeWait,
            seeded: false,
        });
        let v = serde_json::to_value(r.json(&exit)).unwrap();
        assert_eq!(v["event"], "tw_exit");
        assert_eq!(v["reason"], "syn");
        assert_eq!(v["lifetime_ms"], 1500);
        assert!(v["pid"].is_null() && v["comm"].is_null());

        let state = Event::State(Transition {
            netns: 0,
            ts_ns: 7,
            conn: conn(),
            old_state: 5,
            new_state: 7,
            owner: owner(),
            role: Role::Accepted,
            skaddr: 1,
        });
        let v = serde_json::to_value(r.json(&state)).unwrap();
        assert_eq!(v["old_state"], "FIN_WAIT2");
        assert_eq!(v["new_state"], "CLOSE");
    }

    #[test]
    fn text_lines_fit_and_say_why() {
        let mut r = renderer(None);
        let exit = Event::Exit(TwExit {
            netns: 0,
            ts_ns: 0,
            timer: 1,
            conn: Some(Conn {
                local: "10.0.0.1:40000".parse().unwrap(),
                remote: "10.0.0.2:6379".parse().unwrap(),
            }),
            owner: owner(),
            role: Role::Connected,
            reason: Reason::Expired,
            lifetime_ns: Some(60_310_000_000),
            substate: crate::track::lifecycle::Substate::TimeWait,
            seeded: false,
        });
        let line = r.text(&exit);
        assert_eq!(
            line,
            "01:00:00.000 EXIT       42 curl            10.0.0.1:40000 > 10.0.0.2:6379 (out) \
             expired after 60.31s"
        );
        assert!(Renderer::HEADER.len() <= 80);
        let unknown = Event::Exit(TwExit {
            netns: 0,
            lifetime_ns: None,
            substate: crate::track::lifecycle::Substate::TimeWait,
            owner: None,
            conn: None,
            ..match exit {
                Event::Exit(e) => e,
                _ => unreachable!(),
            }
        });
        assert_eq!(
            r.text(&unknown),
            "01:00:00.000 EXIT        - -               ? > ? (out) expired (born before start)"
        );
    }

    #[test]
    fn closed_stdout_stops_the_stream() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let ev = Event::State(Transition {
            netns: 0,
            ts_ns: 0,
            conn: conn(),
            old_state: 1,
            new_state: 4,
            owner: None,
            role: Role::Unknown,
            skaddr: 0,
        });
        assert!(!emit(
            &mut Closed,
            &mut renderer(None),
            &Filter::default(),
            true,
            &[ev]
        ));
    }
}
