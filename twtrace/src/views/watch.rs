//! `twtrace watch`: every TIME_WAIT birth and death as it happens, as text or JSON lines.

use std::{
    io::{self, Write},
    net::IpAddr,
};

use serde::Serialize;

use crate::{
    cli::WatchArgs,
    host::clock::{TimeStyle, WallClock, jiffies_to_ms},
    host::netns::{self, Registry},
    kernel::decode::Role,
    kernel::probes::ProbeOptions,
    output::{self, printable},
    say,
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
    /// Local time or UTC, and the format (`--utc`, `--time`).
    pub time: TimeStyle,
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
    /// The column titles, the TIME column as wide as the times.
    pub fn header(&self) -> String {
        format!(
            "{:<w$} EVENT     PID COMM            LOCAL > REMOTE (ROLE) DETAIL",
            "TIME",
            w = self.time.width()
        )
    }

    /// One line of text for a terminal: every character a terminal would act on is escaped
    /// (a process may name itself with escape sequences or a newline).
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
        let line = format!(
            "{} {:<5} {:>7} {:<15} {} ({}) {}{place}",
            self.time.format(self.wall.epoch_ns(ev.ts_ns())),
            name,
            pid,
            comm,
            conn,
            role_short(ev.role()),
            detail
        );
        printable(line.trim_end()).into_owned()
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

/// What watch showed, for its closing line.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Shown {
    pub births: u64,
    pub ends: u64,
}

/// Which events watch shows: the filters, and with `--new-only` no end of a socket born
/// before start.
pub struct Selection {
    pub filter: Filter,
    pub new_only: bool,
}

impl Selection {
    pub fn shows(&self, ev: &Event) -> bool {
        // A seeded `Enter` (typed loads only, see `Session::start`) is no birth.
        let seeded = matches!(ev, Event::Enter(e) if e.seeded);
        let old = matches!(ev, Event::Exit(x) if x.lifetime_ns.is_none());
        !seeded && !(self.new_only && old) && self.filter.matches(ev)
    }

    /// Everything passes: the closing line can speak of all traffic.
    fn everything(&self) -> bool {
        !self.new_only && self.filter == Filter::default()
    }
}

pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    let selection = Selection {
        filter: args.filter.to_filter(),
        new_only: args.new_only,
    };
    let stats_file = output::create_opt("--stats-json", args.probe.stats_json.as_ref())?;
    // The handlers first: a signal from now on (while attaching too) ends the run cleanly.
    let stop = session::stop_signal(args.duration)?;
    tokio::pin!(stop);
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
        time: TimeStyle::new(args.time, args.utc),
        hz: session.hz,
        netns: netns::own()
            .filter(|_| several && !args.json)
            .map(|own| (own, Registry::new())),
    };
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut shown = Shown::default();
    // A write that fails for another reason than a reader leaving: said after the summary.
    let mut failed = None;
    let mut open = true;
    if !args.json {
        let header = renderer.header();
        if let Err(e) = writeln!(out, "{header}").and_then(|()| out.flush()) {
            open = false;
            failed = output::stdout_failure(&e);
        }
    }
    let mut show = |events: &[Event]| -> bool {
        match emit(
            &mut out,
            &mut renderer,
            &selection,
            args.json,
            events,
            &mut shown,
        ) {
            Ok(()) => true,
            Err(e) => {
                failed = output::stdout_failure(&e);
                false
            }
        }
    };
    if open {
        say!("tracing TIME_WAIT; Ctrl-C to stop");
        loop {
            let events = tokio::select! {
                r = &mut stop => { r?; break; }
                r = session.next() => r?,
            };
            if !show(events) {
                open = false;
                break;
            }
        }
    }
    if open {
        show(session.finish());
    }
    let loss = session.loss();
    let stats = session.write_stats(stats_file);
    say!("{}", summary(&session, &selection, shown));
    say!("{}", session::loss_line(&loss));
    stats?;
    match failed {
        Some(f) => Err(f.into()),
        None => Ok(()),
    }
}

/// The closing line: what was shown, and when filters left some out, what was seen.
fn summary(session: &Session, selection: &Selection, shown: Shown) -> String {
    if selection.everything() {
        format!("{} (all traffic)", session.summary())
    } else {
        let all = session.counts();
        format!(
            "{} TIME_WAIT births and {} ends shown (of {} and {} seen in all traffic)",
            shown.births, shown.ends, all.births, all.exits
        )
    }
}

/// Writes the events that pass the selection; an error once stdout is closed or full.
fn emit(
    out: &mut impl Write,
    r: &mut Renderer,
    selection: &Selection,
    json: bool,
    events: &[Event],
    shown: &mut Shown,
) -> io::Result<()> {
    for ev in events.iter().filter(|e| selection.shows(e)) {
        match ev {
            Event::Enter(_) => shown.births += 1,
            Event::Exit(_) => shown.ends += 1,
            Event::State(_) | Event::Rearm(_) | Event::ConnectFail(_) => {}
        }
        if json {
            serde_json::to_writer(&mut *out, &r.json(ev))?;
            out.write_all(b"\n")?;
        } else {
            writeln!(out, "{}", r.text(ev))?;
        }
    }
    out.flush()
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
            time: TimeStyle::in_zone(crate::cli::TimeFormat::Clock, jiff::tz::TimeZone::UTC),
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
        assert!(r.header().len() <= 80);
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
        let all = Selection {
            filter: Filter::default(),
            new_only: false,
        };
        let e = emit(
            &mut Closed,
            &mut renderer(None),
            &all,
            true,
            &[ev],
            &mut Shown::default(),
        )
        .unwrap_err();
        assert!(
            output::stdout_failure(&e).is_none(),
            "a reader leaving is no failure"
        );
    }

    /// A process name with an escape sequence and a newline stays on one line, escaped.
    #[test]
    fn control_characters_in_names_are_escaped() {
        let mut r = renderer(None);
        let mut p = owner().unwrap();
        p.comm = "\x1b[2Jevil\nname".into();
        let ev = Event::Enter(TwEnter {
            netns: 0,
            ts_ns: 0,
            timer: 1,
            conn: conn(),
            owner: Some(p),
            role: Role::Connected,
            timeout_jiffies: 0,
            substate: crate::track::lifecycle::Substate::TimeWait,
            bound: false,
            seeded: false,
        });
        let line = r.text(&ev);
        assert!(!line.contains('\n') && !line.contains('\x1b'), "{line:?}");
        assert!(line.contains("\\e[2Jevil\\nname"), "{line}");
    }

    /// `--new-only` leaves out the ends of sockets born before start, and nothing else.
    #[test]
    fn new_only_leaves_out_what_was_born_before_start() {
        let exit = |lifetime_ns| {
            Event::Exit(TwExit {
                netns: 0,
                ts_ns: 0,
                timer: 1,
                conn: Some(conn()),
                owner: None,
                role: Role::Connected,
                reason: Reason::Expired,
                lifetime_ns,
                substate: crate::track::lifecycle::Substate::TimeWait,
                seeded: false,
            })
        };
        let sel = Selection {
            filter: Filter::default(),
            new_only: true,
        };
        assert!(!sel.shows(&exit(None)));
        assert!(sel.shows(&exit(Some(1))));
        let mut shown = Shown::default();
        let mut out = Vec::new();
        emit(
            &mut out,
            &mut renderer(None),
            &sel,
            false,
            &[exit(None), exit(Some(5))],
            &mut shown,
        )
        .unwrap();
        assert_eq!(shown, Shown { births: 0, ends: 1 });
        assert_eq!(String::from_utf8(out).unwrap().lines().count(), 1);
    }
}
