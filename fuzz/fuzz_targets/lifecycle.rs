//! `twtrace::track::lifecycle::Lifecycle` then `twtrace::track::aggregate::Aggregator`, fed sequences of
//! kernel events that collide on purpose: 4 CPUs, 8 timer addresses, a few dozen 4-tuples, a
//! cap of 4 groups so that folding happens.
//!
//! Input: 8-byte operations (a short last one is padded with zeros):
//!
//! | byte | meaning |
//! |------|---------|
//! | 0    | operation, `% 16`: see `OPS` |
//! | 1    | CPU (`% 4`) |
//! | 2    | timer address (`% 8`), bit 3 the network namespace (one of two) |
//! | 3    | 4-tuple: bit 7 IPv6, bits 0-1 local port, bits 2-3 remote host, bit 4 remote port, bits 5-6 more local ports |
//! | 4    | bit 0 reuse, bit 1 the timer event carries its 4-tuple, bit 2 owner known, bits 3-4 which owner, bits 5-6 role, bit 7 bound (births) or inside a connect() to the 4-tuple's remote (cancels) |
//! | 5    | time step, in units of byte 6 |
//! | 6    | bits 0-1 unit (1 us, 1 ms, 10 ms, 1 s), bit 2 step back (events of other CPUs arrive late) |
//! | 7    | extra: timeout (jiffies / 64; bit 0 of a birth or re-arm: the FIN_WAIT2 substate), seed's remaining time (s), settle's delay (ms), states |
//!
//! Checked after every operation: the aggregate's TIME_WAIT and FIN_WAIT2 substates equal what
//! the lifecycle knows alive in each, also per namespace,
//! each grouping's groups and `other` add up to the totals, and totals.entered counts the
//! non-seeded `Enter` events fed. An underflow of a counter panics (debug assertions are on).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use twtrace::kernel::decode::{Conn, KernelEvent, Process, Role};
use twtrace::track::aggregate::{Aggregator, By};
use twtrace::track::lifecycle::{Event, Lifecycle, Substate};

#[derive(Clone, Copy, Debug)]
enum Op {
    Birth,
    Cancel,
    Expire,
    Rearm,
    Syn,
    State,
    Settle,
    Tick,
    Seed,
}

/// Indexed by byte 0 `% 16`: births and cancels are the common events.
const OPS: [Op; 16] = [
    Op::Birth,
    Op::Cancel,
    Op::Expire,
    Op::Rearm,
    Op::Syn,
    Op::State,
    Op::Settle,
    Op::Tick,
    Op::Seed,
    Op::Birth,
    Op::Cancel,
    Op::Cancel,
    Op::Expire,
    Op::Birth,
    Op::Rearm,
    Op::Tick,
];

const UNITS_NS: [u64; 4] = [1_000, 1_000_000, 10_000_000, 1_000_000_000];
/// Monotonic time of the first event: any time well after boot.
const START_NS: u64 = 1_000_000_000_000;

fn conn(b: u8) -> Conn {
    let lport = 40_000 + (b & 3) as u16 + 4 * ((b >> 5) & 3) as u16;
    let host = (b >> 2) & 3;
    let rport = if b & 0x10 == 0 { 80 } else { 443 };
    let (local, remote): (IpAddr, IpAddr) = if b & 0x80 == 0 {
        (
            Ipv4Addr::new(10, 0, 0, 1).into(),
            Ipv4Addr::new(10, 0, 1, host).into(),
        )
    } else {
        (
            Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1).into(),
            Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, host as u16).into(),
        )
    };
    Conn {
        local: SocketAddr::new(local, lport),
        remote: SocketAddr::new(remote, rport),
    }
}

fn owner(b: u8) -> Option<Process> {
    (b & 4 != 0).then(|| {
        let i = ((b >> 3) & 3) as u32;
        Process {
            pid: 100 + i,
            tid: 100 + i,
            comm: ["curl", "nginx", "api", "worker"][i as usize].into(),
            cgroup_id: 1 + (i as u64 & 1),
        }
    })
}

fn role(b: u8) -> Role {
    [
        Role::Unknown,
        Role::Connected,
        Role::Accepted,
        Role::Connected,
    ][((b >> 5) & 3) as usize]
}

struct Run {
    life: Lifecycle,
    agg: Aggregator,
    out: Vec<Event>,
    /// Non-seeded `Enter` events fed to the aggregator.
    births: u64,
}

impl Run {
    /// Feeds what the lifecycle produced to the aggregator, then checks the invariants.
    fn drain(&mut self) {
        for ev in self.out.drain(..) {
            if let Event::Enter(e) = &ev
                && !e.seeded
            {
                self.births += 1;
            }
            self.agg.on_event(&ev);
        }
        self.check();
    }

    fn check(&self) {
        let t = self.agg.totals();
        assert_eq!(t.entered, self.births, "totals.entered != births fed");
        for (substate, held) in [
            (Substate::TimeWait, t.in_time_wait),
            (Substate::FinWait2, t.in_fin_wait2),
        ] {
            let alive = self.life.alive().filter(|e| e.substate == substate).count() as u64;
            assert_eq!(
                held, alive,
                "aggregate says {held} in {substate:?}, lifecycle knows {alive} alive"
            );
        }
        for netns in [4026531840, 4026531841] {
            let (tw, fw2) = self.agg.in_netns(netns);
            let alive = self.life.alive().filter(|e| e.netns == netns).count() as u64;
            assert_eq!(tw + fw2, alive, "namespace {netns}");
        }
        // `Totals::seeded`: of those, how many were seeded at start (this target once found
        // it was not decremented when a seeded socket ended).
        let seeded = self.life.alive().filter(|e| e.seeded).count() as u64;
        assert_eq!(t.seeded, seeded, "seeded in the aggregate != seeds alive");
        for by in By::ALL {
            let (groups, other) = self.agg.groups(by);
            assert!(
                groups.len() <= 2 * self.agg.cap(),
                "{} groups by {by}",
                groups.len()
            );
            let other_tw = other.map_or(0, |o| o.in_time_wait);
            let tw: u64 = groups.iter().map(|(_, g)| g.in_time_wait).sum::<u64>() + other_tw;
            assert_eq!(tw, t.in_time_wait, "groups by {by} hold {tw} in TIME_WAIT");
            let entered: u64 =
                groups.iter().map(|(_, g)| g.entered).sum::<u64>() + other.map_or(0, |o| o.entered);
            assert_eq!(
                entered, t.entered,
                "groups by {by} counted {entered} births"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut run = Run {
        life: Lifecycle::new(),
        agg: Aggregator::new(4),
        out: Vec::new(),
        births: 0,
    };
    let mut ts = START_NS;
    for chunk in data.chunks(8) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        let step = b[5] as u64 * UNITS_NS[(b[6] & 3) as usize];
        ts = if b[6] & 4 != 0 {
            ts.saturating_sub(step).max(START_NS)
        } else {
            ts + step
        };
        let cpu = (b[1] % 4) as u32;
        let timer = (b[2] % 8) as u64;
        let c = conn(b[3]);
        let netns = 4026531840 + ((b[2] >> 3) & 1) as u32;
        // tcp_states.h: FIN_WAIT2 5, TIME_WAIT 6.
        let substate = if b[7] & 1 != 0 { 5 } else { 6 };
        let tuple = (b[4] & 2 != 0).then_some(c);
        let ev = match OPS[(b[0] % 16) as usize] {
            Op::Birth => KernelEvent::Birth {
                cpu,
                ts_ns: ts,
                timer,
                conn: c,
                owner: owner(b[4]),
                role: role(b[4]),
                timeout_jiffies: b[7] as u32 * 64,
                netns,
                substate,
                bound: b[4] & 0x80 != 0,
            },
            Op::Cancel => KernelEvent::Cancel {
                cpu,
                ts_ns: ts,
                timer,
                conn: tuple,
                netns,
                reuse: b[4] & 1 != 0,
                in_connect_to: (b[4] & 0x80 != 0).then_some(c.remote),
            },
            Op::Expire => KernelEvent::Expire {
                cpu,
                ts_ns: ts,
                timer,
                conn: tuple,
                netns,
            },
            Op::Rearm => KernelEvent::Rearm {
                cpu,
                ts_ns: ts,
                timer,
                conn: tuple,
                netns,
                timeout_jiffies: b[7] as u32 * 64,
                substate,
            },
            Op::Syn => KernelEvent::SynTakeover {
                cpu,
                ts_ns: ts,
                timer,
            },
            Op::State => KernelEvent::State {
                cpu,
                ts_ns: ts,
                conn: c,
                netns,
                old_state: b[7] & 15,
                new_state: b[7] >> 4,
                owner: owner(b[4]),
                role: role(b[4]),
                skaddr: timer,
            },
            Op::Settle => {
                run.life.settle(ts + b[7] as u64 * 1_000_000, &mut run.out);
                run.drain();
                continue;
            }
            Op::Tick => {
                run.agg.tick();
                run.check();
                continue;
            }
            Op::Seed => {
                // As at start-up: sock_diag's remaining time, at most a minute.
                run.life.seed(
                    c,
                    netns,
                    role(b[4]),
                    Substate::TimeWait,
                    ts,
                    (b[7] % 61) as u64 * 1000,
                    &mut run.out,
                );
                run.drain();
                continue;
            }
        };
        run.life.feed(ev, &mut run.out);
        run.drain();
    }
    // Shutdown: every waiting cancel ends; then every seed is overdue.
    run.life.flush(&mut run.out);
    run.drain();
    run.life.settle(u64::MAX, &mut run.out);
    run.drain();
    assert_eq!(run.agg.totals().seeded, 0);
    let t = run.agg.totals();
    assert_eq!(
        t.in_time_wait + t.in_fin_wait2,
        run.life.live_count() as u64
    );
    run.agg.tick();
    run.check();
});
