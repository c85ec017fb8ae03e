//! `twtrace exec [budgets] -- CMD ARGS...`: runs CMD and charges it with the TIME_WAIT its own
//! process tree causes (children included, followed in the kernel from the moment they fork),
//! then says so and exits with CMD's exit code, or 124 when a budget was exceeded (125 when
//! twtrace itself fails, 126 or 127 when CMD cannot be run, as timeout(1) and env(1) do). Made
//! to guard a CI job against a change that stops reusing connections.
//!
//! The summary goes to stderr, or to `--summary FILE` (text, or one JSON line with `--json`):
//! CMD's stdout stays CMD's.
//!
//! SIGINT, SIGTERM and SIGHUP are passed on to CMD, each time one arrives, unless CMD got it
//! already: a signal the kernel sent (a Ctrl-C in the terminal goes to the whole foreground
//! process group, CMD included) or that CMD sent. twtrace returns only once CMD has exited.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    os::unix::process::ExitStatusExt,
    process::ExitStatus,
    time::{Duration, Instant},
};

use serde_json::json;

use crate::{
    cli::ExecArgs,
    failure::{ExitWith, exec_code},
    host::collect::Request,
    kernel::probes::ProbeOptions,
    output::{self, printable},
    say,
    track::lifecycle::{Event, FailReason},
    track::session::{self, Session},
};

/// After CMD exits, how long to keep reading: a TIME_WAIT is born when the peer's FIN arrives,
/// which can be after the process that closed is gone.
const DRAIN: Duration = Duration::from_millis(300);

/// What the tree caused, built from lifecycle events. Pure.
#[derive(Debug, Default)]
pub struct Charge {
    pub births: u64,
    pub ends: u64,
    pub by_peer: HashMap<SocketAddr, u64>,
    pub by_local_port: HashMap<u16, u64>,
    /// Births in the last second (timestamps), for the peak rate.
    window: VecDeque<u64>,
    pub peak_per_s: u64,
    timers: HashSet<u64>,
    /// connect() calls of the tree that never connected, by reason (`FailReason::ALL` order).
    pub connect_failures: [u64; 6],
}

impl Charge {
    /// `owned(tgid)` says whether a process belongs to the tree.
    pub fn feed(&mut self, ev: &Event, owned: &mut dyn FnMut(u32) -> bool) {
        match ev {
            Event::Enter(e) if !e.seeded => {
                let Some(owner) = &e.owner else { return };
                if !owned(owner.pid) {
                    return;
                }
                self.births += 1;
                *self.by_peer.entry(e.conn.remote).or_default() += 1;
                *self.by_local_port.entry(e.conn.local.port()).or_default() += 1;
                self.timers.insert(e.timer);
                self.window.push_back(e.ts_ns);
                while self
                    .window
                    .front()
                    .is_some_and(|&t| e.ts_ns.saturating_sub(t) >= 1_000_000_000)
                {
                    self.window.pop_front();
                }
                self.peak_per_s = self.peak_per_s.max(self.window.len() as u64);
            }
            Event::Exit(x) if !x.seeded && self.timers.remove(&x.timer) => self.ends += 1,
            Event::ConnectFail(f) if f.owner.as_ref().is_some_and(|o| owned(o.pid)) => {
                self.connect_failures[f.reason.index()] += 1;
            }
            _ => {}
        }
    }

    pub fn still_held(&self) -> u64 {
        self.births - self.ends
    }
}

fn top(map: &HashMap<impl ToString + Ord + Copy, u64>, n: usize) -> Vec<(String, u64)> {
    let mut v: Vec<_> = map.iter().map(|(k, c)| (*k, *c)).collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.into_iter()
        .take(n)
        .map(|(k, c)| (k.to_string(), c))
        .collect()
}

/// Which budgets were exceeded, named as their options.
pub fn exceeded(c: &Charge, max_timewait: Option<u64>, max_rate: Option<f64>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(max) = max_timewait
        && c.births > max
    {
        out.push(format!(
            "--max-timewait {max} exceeded: {} TIME_WAIT caused",
            c.births
        ));
    }
    if let Some(max) = max_rate
        && c.peak_per_s as f64 > max
    {
        out.push(format!(
            "--max-rate {max} exceeded: {} TIME_WAIT births in one second",
            c.peak_per_s
        ));
    }
    out
}

/// The signals passed on to the command, and who sent each last (`si_code << 32 | si_pid`),
/// recorded by a handler of our own beside tokio's (both through signal-hook-registry).
const FORWARDED: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
static ORIGIN: [std::sync::atomic::AtomicI64; 3] =
    [const { std::sync::atomic::AtomicI64::new(0) }; 3];
/// `si_code` of a signal the kernel sent itself: a terminal's Ctrl-C, sent to the whole
/// foreground process group.
const SI_KERNEL: i32 = 0x80;

fn record_origins() -> std::io::Result<()> {
    for (i, &sig) in FORWARDED.iter().enumerate() {
        // SAFETY: the action only stores into an atomic, which is async-signal-safe.
        unsafe {
            signal_hook_registry::register_sigaction(sig, move |info: &libc::siginfo_t| {
                let pid = info.si_pid() as u32 as i64;
                ORIGIN[i].store(
                    ((info.si_code as i64) << 32) | pid,
                    std::sync::atomic::Ordering::SeqCst,
                );
            })?;
        }
    }
    Ok(())
}

/// Whether the command must be sent the signal twtrace just received: not when the kernel
/// sent it (the command's process group got it too) nor when the command sent it.
pub fn should_forward(si_code: i32, si_pid: u32, child: u32) -> bool {
    si_code != SI_KERNEL && si_pid != child
}

fn exit_code(status: &ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c as u8,
        (None, Some(sig)) => 128u8.wrapping_add(sig as u8),
        _ => 1,
    }
}

pub async fn run(args: ExecArgs) -> anyhow::Result<()> {
    let stats_file = output::create_opt("--stats-json", args.probe.stats_json.as_ref())?;
    let summary_file = output::create_opt("--summary", args.summary.as_ref())?;
    let mut session = Session::start(
        ProbeOptions {
            track_forks: true,
            ..args.probe.options()
        },
        false,
    )?;
    // twtrace itself is the root of the tree: the command, forked from it, joins at birth.
    let me = std::process::id();
    session.probes.track(me)?;
    // The handlers, before the command starts: a signal from then on reaches the command.
    // Who sent it is recorded first (the actions run in the order they were registered), so
    // that it is known by the time tokio wakes the loop.
    record_origins()?;
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let started = Instant::now();
    let mut child = match tokio::process::Command::new(&args.command[0])
        .args(&args.command[1..])
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            say!("cannot run '{}': {e}", args.command[0]);
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                exec_code::NOT_FOUND
            } else {
                exec_code::CANNOT_RUN
            };
            return Err(ExitWith(code).into());
        }
    };
    let child_pid = child.id().unwrap_or(0);
    let mut charge = Charge::default();
    let mut known: HashSet<u32> = HashSet::new();
    let only = args.netns.netns.clone();
    let wanted = |ev: &Event| only.is_empty() || only.contains(&ev.netns());
    // Each signal is passed on when it arrives; only the command's exit ends the run (a
    // command that ignores them keeps twtrace waiting, as env(1) would).
    let forward = |i: usize| {
        let origin = ORIGIN[i].load(std::sync::atomic::Ordering::SeqCst);
        let (code, pid) = ((origin >> 32) as i32, origin as u32);
        if child_pid != 0 && should_forward(code, pid, child_pid) {
            // SAFETY: signalling our own child, which is not reaped before `wait` returns.
            unsafe { libc::kill(child_pid as i32, FORWARDED[i]) };
        }
    };
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            Some(()) = int.recv() => forward(0),
            Some(()) = term.recv() => forward(1),
            Some(()) = hup.recv() => forward(2),
            r = session.next() => {
                // Copied out: telling members apart asks the session's probes.
                let events = r?.to_vec();
                for ev in events.iter().filter(|e| wanted(e)) {
                    charge.feed(ev, &mut |pid| owned(&session.probes, &mut known, me, pid));
                }
            }
        }
    };
    let drain_until = Instant::now() + DRAIN;
    while Instant::now() < drain_until {
        let left = drain_until.saturating_duration_since(Instant::now());
        if let Ok(r) = tokio::time::timeout(left, session.next()).await {
            let events = r?.to_vec();
            for ev in events.iter().filter(|e| wanted(e)) {
                charge.feed(ev, &mut |pid| owned(&session.probes, &mut known, me, pid));
            }
        }
    }
    let events: Vec<Event> = session.finish().to_vec();
    for ev in events.iter().filter(|e| wanted(e)) {
        charge.feed(ev, &mut |pid| owned(&session.probes, &mut known, me, pid));
    }
    // CLOSE_WAIT still held by processes of the tree, in whichever namespace.
    session.gather(&Request {
        figures: Some(Vec::new()),
        close_wait: Some(only.clone()),
        lookups: Vec::new(),
    });
    let mut close_wait = session.host.close_wait.clone();
    close_wait.retain(|c| session.probes.is_tracked(c.pid));
    let over = exceeded(&charge, args.max_timewait, args.max_rate);
    let loss = session.loss();
    let code = exit_code(&status);
    let duration = started.elapsed().as_secs_f64();
    let mut text = String::new();
    if args.json {
        text = json!({
            "command": args.command,
            "exit_code": code,
            "duration_s": (duration * 100.0).round() / 100.0,
            "births": charge.births,
            "peak_per_s": charge.peak_per_s,
            "still_in_time_wait": charge.still_held(),
            "by_peer": top(&charge.by_peer, 20).iter().map(|(k, n)| json!({"key": k, "births": n})).collect::<Vec<_>>(),
            "by_local_port": top(&charge.by_local_port, 20).iter().map(|(k, n)| json!({"key": k, "births": n})).collect::<Vec<_>>(),
            "close_wait": close_wait.iter().map(|c| json!({"pid": c.pid, "comm": c.comm, "sockets": c.sockets})).collect::<Vec<_>>(),
            "connect_failures": FailReason::ALL.iter().map(|r| (r.as_str().to_owned(), json!(charge.connect_failures[r.index()]))).collect::<serde_json::Map<_, _>>(),
            "budgets": {"max_timewait": args.max_timewait, "max_rate": args.max_rate, "exceeded": over},
            "lost_events": loss.total(),
        })
        .to_string();
        text.push('\n');
    } else {
        use std::fmt::Write as _;
        let _ = writeln!(
            text,
            "twtrace exec: '{}' exited {code} after {duration:.2}s",
            printable(&args.command.join(" "))
        );
        let _ = writeln!(
            text,
            "  TIME_WAIT caused: {} (peak {}/s), {} still in TIME_WAIT",
            charge.births,
            charge.peak_per_s,
            charge.still_held()
        );
        for (k, n) in top(&charge.by_peer, 5) {
            let _ = writeln!(text, "  to {k}: {n}");
        }
        for (k, n) in top(&charge.by_local_port, 5) {
            let _ = writeln!(text, "  from local port {k}: {n}");
        }
        for c in &close_wait {
            let _ = writeln!(
                text,
                "  CLOSE_WAIT left behind by {}[{}]: {}",
                printable(&c.comm),
                c.pid,
                c.sockets
            );
        }
        let failed: u64 = charge.connect_failures.iter().sum();
        if failed > 0 {
            let why: Vec<String> = FailReason::ALL
                .iter()
                .filter(|r| charge.connect_failures[r.index()] > 0)
                .map(|r| format!("{} {}", charge.connect_failures[r.index()], r.as_str()))
                .collect();
            let _ = writeln!(text, "  failed connects: {failed} ({})", why.join(", "));
        }
        if loss.total() > 0 {
            let _ = writeln!(
                text,
                "  INCOMPLETE: {} (the counts may be low)",
                session::loss_line(&loss)
            );
        }
        for o in &over {
            let _ = writeln!(text, "  BUDGET: {o}");
        }
    }
    match summary_file {
        Some(mut f) => {
            use std::io::Write as _;
            if let Err(e) = f.write_all(text.as_bytes()) {
                say!("cannot write --summary: {e}");
            }
        }
        None => crate::say_raw!("{text}"),
    }
    if let Err(e) = session.write_stats(stats_file) {
        say!("{e:#}");
    }
    let code = if over.is_empty() {
        code
    } else {
        exec_code::BUDGET
    };
    if code == 0 {
        Ok(())
    } else {
        Err(ExitWith(code).into())
    }
}

/// Whether `pid` (a tgid) belongs to the command's tree; twtrace itself does not count.
/// Members are cached (a member stays one); others are asked each time, since a pid can be
/// reused by a later child of the tree.
fn owned(
    probes: &crate::kernel::probes::Probes,
    known: &mut HashSet<u32>,
    me: u32,
    pid: u32,
) -> bool {
    if pid == me {
        return false;
    }
    if known.contains(&pid) {
        return true;
    }
    let yes = probes.is_tracked(pid);
    if yes {
        known.insert(pid);
    }
    yes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        kernel::decode::{Conn, Process, Role},
        track::lifecycle::{Reason, TwEnter, TwExit},
    };

    fn enter(timer: u64, ts_ns: u64, pid: u32, port: u16) -> Event {
        Event::Enter(TwEnter {
            netns: 0,
            ts_ns,
            timer,
            conn: Conn {
                local: format!("127.0.0.1:{port}").parse().unwrap(),
                remote: "127.0.0.1:8080".parse().unwrap(),
            },
            owner: Some(Process {
                pid,
                tid: pid,
                comm: "curl".into(),
                cgroup_id: 0,
            }),
            role: Role::Connected,
            timeout_jiffies: 0,
            substate: crate::track::lifecycle::Substate::TimeWait,
            bound: false,
            seeded: false,
        })
    }

    #[test]
    fn signals_the_command_got_already_are_not_sent_again() {
        // kill(2) from another process: SI_USER (0).
        assert!(should_forward(0, 4242, 77));
        // A terminal's Ctrl-C: the kernel sent it to the whole process group.
        assert!(!should_forward(SI_KERNEL, 0, 77));
        // The command signalling its parent.
        assert!(!should_forward(0, 77, 77));
    }

    #[test]
    fn charges_only_the_tree_and_finds_the_peak_rate() {
        let mut c = Charge::default();
        let mut tree = |pid: u32| pid == 10 || pid == 11;
        for i in 0..5u64 {
            c.feed(&enter(i, i * 100_000_000, 10, 40000 + i as u16), &mut tree);
        }
        c.feed(&enter(99, 0, 77, 1), &mut tree); // another process
        c.feed(&enter(5, 2_000_000_000, 11, 40100), &mut tree);
        assert_eq!(c.births, 6);
        assert_eq!(c.peak_per_s, 5);
        assert_eq!(c.by_peer[&"127.0.0.1:8080".parse().unwrap()], 6);
        c.feed(
            &Event::Exit(TwExit {
                netns: 0,
                ts_ns: 3,
                timer: 5,
                conn: None,
                owner: None,
                role: Role::Connected,
                reason: Reason::Reused,
                lifetime_ns: Some(1),
                substate: crate::track::lifecycle::Substate::TimeWait,
                seeded: false,
            }),
            &mut tree,
        );
        assert_eq!(c.still_held(), 5);
        assert_eq!(
            exceeded(&c, Some(10), Some(4.0)),
            vec!["--max-rate 4 exceeded: 5 TIME_WAIT births in one second".to_owned()]
        );
        assert_eq!(exceeded(&c, Some(5), None).len(), 1);
        assert!(exceeded(&c, Some(6), Some(5.0)).is_empty());
    }
}
