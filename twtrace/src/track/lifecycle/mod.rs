//! Kernel facts -> TIME_WAIT lifecycles: who entered, who left, why, after how long.
//!
//! The kernel programs report what the timer tracepoints show and nothing more. One fact needs
//! context to be understood: every end of a TIME_WAIT socket starts with `timer_cancel`, but so
//! do its expiry (the timer is detached just before it runs) and its re-arm (`mod_timer_pending`
//! detaches, then enqueues). Both of those happen back to back on the same CPU with interrupts
//! off, so the kernel's next event *from that CPU* settles what a cancel was:
//!
//! | next event from the CPU      | the cancel was                               |
//! |------------------------------|----------------------------------------------|
//! | expire of the same timer     | the expiry: reason `expired`                 |
//! | re-arm of the same timer     | a restart: the FIN_WAIT2 substate became     |
//! |                              | TIME_WAIT (the peer's FIN), or a retransmitted|
//! |                              | FIN restarted the 60 s: nothing ended        |
//! | SYN take-over of the timer   | a new SYN took the 4-tuple: reason `syn`     |
//! | anything else, or nothing    | an early end: `reused` (connect() reuse, the |
//! | within `SETTLE_NS`           | kernel flags it) or `killed` (RST, ss -K, …) |
//!
//! Pure: fed events built in code by the unit tests.

// Every event passes through these maps: a fast (seeded) hash rather than SipHash. Their keys
// are kernel addresses and 4-tuples known at start, not values a remote peer picks.
use foldhash::HashMap;

use twtrace_common::tcp_state;

use crate::kernel::decode::{Conn, KernelEvent, Role};

mod events;
mod hidden;
mod store;

pub use events::*;
use store::{Live, LiveSet, Owners, PackedConn};

/// A TIME_WAIT socket that existed at start, known by its 4-tuple.
#[derive(Debug, Clone, Copy)]
struct Seed {
    role: Role,
    substate: Substate,
    /// When the kernel will expire it (monotonic ns), from sock_diag's idiag_expires.
    deadline_ns: u64,
}

/// A seeded socket whose end was not seen this long after its deadline is taken as expired
/// (its end was lost): the "now" figures heal themselves. More than the timer wheel's lateness:
/// it rounds a 60 s timer up to its bucket's end (calc_index), and a bucket that far out is
/// 512 jiffies wide at HZ 100 and 250 (5.12 s, 2.05 s) and 4,096 at HZ 1000 (4.1 s).
pub const SEED_GRACE_NS: u64 = 6_000_000_000;

#[derive(Debug, Clone)]
struct PendingCancel {
    timer: u64,
    ts_ns: u64,
    reuse: bool,
    conn: Option<Conn>,
    netns: u32,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LifecycleStats {
    pub births: u64,
    pub exits: u64,
    /// Re-arms seen (a FIN_WAIT2-substate socket becoming TIME_WAIT, or a restarted 60 s).
    pub rearms: u64,
    /// A birth arrived for a timer still thought alive: its end was lost or hidden.
    pub replaced: u64,
    /// Seeded sockets ended by their deadline, their end unseen.
    pub overdue_seeds: u64,
    /// Ends of timers born before start, whose socket the kernel could not read (typed loads
    /// only): not counted as ends (the seeded sockets end at their deadline instead).
    pub unknown_ends: u64,
    /// Seeded sockets ended as `killed` because their namespace was dismantled (typed loads
    /// only, where their own end cannot be told apart).
    pub seeds_of_gone_namespaces: u64,
    /// Re-arms no event showed (the timer stayed in its wheel bucket), found by looking the
    /// socket up: counted in `rearms` too.
    pub hidden_rearms: u64,
    /// FIN_WAIT2-substate births never looked up: more were waiting than the lookups keep.
    pub lookups_skipped: u64,
}

#[derive(Default)]
pub struct Lifecycle {
    live: LiveSet,
    owners: Owners,
    /// Indexed by CPU: at most one unexplained cancel per CPU.
    pending: Vec<Option<PendingCancel>>,
    /// By namespace and 4-tuple: the same 4-tuple can live in several namespaces.
    seeds: HashMap<(u32, Conn), Seed>,
    stats: LifecycleStats,
    /// TCP_TIMEWAIT_LEN in jiffies, when CONFIG_HZ is known: tells the substate of a birth the
    /// kernel could not read (`Substate::at_birth`).
    tw_len_jiffies: Option<u32>,
    /// FIN_WAIT2-substate births to look up, for re-arms the timer wheel hides (`hidden`).
    checks: hidden::Checks,
    /// Timers a lookup found re-armed, and when it looked: a re-arm event from the ring dated
    /// before that is the same re-arm, not another. Kept 1 s.
    hidden_at: HashMap<u64, u64>,
}

/// How long a re-armed timer runs, in ns: `timeout_jiffies` at the HZ that `tw_len_jiffies`
/// (60 s in jiffies) gives, else TCP_TIMEWAIT_LEN (60 s), the only timeout a re-arm sets.
/// A timeout past twice that (a misread timer) is taken as the 60 s.
fn rearm_timeout_ns(timeout_jiffies: u32, tw_len_jiffies: Option<u32>) -> u64 {
    const TW_LEN_NS: u64 = 60_000_000_000;
    match tw_len_jiffies {
        Some(len) if len > 0 && timeout_jiffies > 0 && timeout_jiffies <= len.saturating_mul(2) => {
            u64::from(timeout_jiffies) * TW_LEN_NS / u64::from(len)
        }
        _ => TW_LEN_NS,
    }
}

impl Lifecycle {
    pub fn new() -> Self {
        Self::default()
    }

    /// With CONFIG_HZ (`hz`) known, a birth whose substate the kernel could not read is told
    /// by its timeout.
    pub fn set_hz(&mut self, hz: Option<u32>) {
        self.tw_len_jiffies = hz.map(|hz| 60 * hz);
    }

    /// TIME_WAIT sockets born since start and not yet ended.
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Every TIME_WAIT socket alive now that this lifecycle knows (born since start, or
    /// seeded), as `Enter` events with their birth time: a new aggregate adopts them.
    pub fn alive(&self) -> impl Iterator<Item = TwEnter> + '_ {
        let born = self.live.iter().map(|(timer, l)| TwEnter {
            ts_ns: l.birth_ts,
            timer,
            conn: l.conn.into(),
            netns: l.netns,
            owner: self.owners.get(l.owner),
            role: l.role,
            timeout_jiffies: 0,
            substate: l.substate,
            bound: false,
            seeded: false,
        });
        let seeded = self.seeds.iter().map(|(&(netns, conn), s)| TwEnter {
            ts_ns: 0,
            timer: 0,
            conn,
            netns,
            owner: None,
            role: s.role,
            timeout_jiffies: 0,
            substate: s.substate,
            bound: false,
            seeded: true,
        });
        born.chain(seeded)
    }

    /// The FIN_WAIT2-substate sockets to look up in the kernel now, as (namespace, timer,
    /// 4-tuple): a re-arm into the same wheel bucket shows no event (see `hidden`). Their
    /// answers go to `looked_up`.
    pub fn substate_checks(&mut self, now_ns: u64) -> Vec<(u32, u64, Conn)> {
        self.hidden_at
            .retain(|_, looked| now_ns.saturating_sub(*looked) < 1_000_000_000);
        let live = &self.live;
        let waiting = |timer, birth_ts| {
            live.get(timer).is_some_and(|l| {
                l.birth_ts == birth_ts && l.substate == Substate::FinWait2 && l.netns != 0
            })
        };
        self.checks
            .due(now_ns, waiting)
            .into_iter()
            .filter_map(|(timer, _)| {
                let l = self.live.get(timer)?;
                Some((l.netns, timer, l.conn.into()))
            })
            .collect()
    }

    /// Whether births still wait for a lookup.
    pub fn checks_pending(&self) -> bool {
        !self.checks.is_empty()
    }

    /// What the kernel said of a socket handed out by `substate_checks`, at `now_ns` (when it
    /// was looked up): its state (`tw_substate` for a timewait socket) and the ms its timer had
    /// left. A FIN_WAIT2 socket now in TIME_WAIT was re-armed unseen: a `Rearm`, dated from what
    /// its timer had left (the re-arm set it to TCP_TIMEWAIT_LEN, 60 s).
    pub fn looked_up(
        &mut self,
        (netns, timer, conn): (u32, u64, Conn),
        state: u8,
        expires_ms: u32,
        now_ns: u64,
        out: &mut Vec<Event>,
    ) {
        const TW_LEN_MS: u64 = 60_000;
        let Some(live) = self.live.get_mut(timer) else {
            return;
        };
        // Only a timewait socket is ever in TIME_WAIT (tcp_time_wait() closes the full one).
        if live.netns != netns
            || Conn::from(live.conn) != conn
            || live.substate != Substate::FinWait2
            || state != tcp_state::TIME_WAIT
        {
            return;
        }
        let since_ms = TW_LEN_MS.saturating_sub(u64::from(expires_ms));
        let ts_ns = now_ns
            .saturating_sub(since_ms.saturating_mul(1_000_000))
            .max(live.birth_ts);
        live.substate = Substate::TimeWait;
        let (role, owner) = (live.role, live.owner);
        self.hidden_at.insert(timer, now_ns);
        self.stats.rearms += 1;
        self.stats.hidden_rearms += 1;
        out.push(Event::Rearm(TwRearm {
            ts_ns,
            timer,
            conn,
            netns,
            owner: self.owners.get(owner),
            role,
            from: Substate::FinWait2,
            to: Substate::TimeWait,
            timeout_jiffies: self.tw_len_jiffies.unwrap_or(0),
            seeded: false,
        }));
    }

    /// Whether a seeded socket is still alive (its end unseen so far).
    pub fn has_seeds(&self) -> bool {
        !self.seeds.is_empty()
    }

    pub fn stats(&self) -> LifecycleStats {
        LifecycleStats {
            lookups_skipped: self.checks.skipped,
            ..self.stats
        }
    }

    /// A TIME_WAIT socket that exists now (sock_diag), born before start: emitted as a seeded
    /// `Enter`. Call after the probes are attached, so that its end cannot be missed; a birth
    /// of the same 4-tuple seen later in the ring (it happened between attach and the dump)
    /// replaces it.
    #[allow(clippy::too_many_arguments)]
    pub fn seed(
        &mut self,
        conn: Conn,
        netns: u32,
        role: Role,
        substate: Substate,
        now_ns: u64,
        remaining_ms: u64,
        out: &mut Vec<Event>,
    ) {
        let packed = PackedConn::from(conn);
        if self.seeds.contains_key(&(netns, conn))
            || self
                .live
                .iter()
                .any(|(_, l)| l.conn == packed && l.netns == netns)
        {
            return;
        }
        self.seeds.insert(
            (netns, conn),
            Seed {
                role,
                substate,
                deadline_ns: now_ns + remaining_ms * 1_000_000,
            },
        );
        out.push(Event::Enter(TwEnter {
            ts_ns: now_ns,
            timer: 0,
            conn,
            netns,
            owner: None,
            role,
            timeout_jiffies: 0,
            substate,
            bound: false,
            seeded: true,
        }));
    }

    pub fn feed(&mut self, ev: KernelEvent, out: &mut Vec<Event>) {
        let cpu = ev.cpu() as usize;
        if self.pending.len() <= cpu {
            self.pending.resize(cpu + 1, None);
        }
        if let Some(p) = self.pending[cpu].take() {
            match &ev {
                KernelEvent::Expire { timer, ts_ns, .. } if *timer == p.timer => {
                    self.end(p.timer, Reason::Expired, *ts_ns, p.conn, p.netns, out);
                    return;
                }
                KernelEvent::Rearm {
                    timer,
                    ts_ns,
                    conn,
                    netns,
                    timeout_jiffies,
                    substate,
                    ..
                } if *timer == p.timer => {
                    // The re-arm a lookup found already (its event was still in the ring).
                    if self
                        .hidden_at
                        .remove(timer)
                        .is_some_and(|looked| *ts_ns <= looked)
                    {
                        if let Some(live) = self.live.get_mut(p.timer) {
                            live.last_cancel_ts = p.ts_ns;
                            live.last_cancel_reuse = p.reuse;
                        }
                        return;
                    }
                    self.stats.rearms += 1;
                    let to = Substate::from_kernel(*substate);
                    if let Some(live) = self.live.get_mut(p.timer) {
                        live.last_cancel_ts = p.ts_ns;
                        live.last_cancel_reuse = p.reuse;
                        let from = std::mem::replace(&mut live.substate, to);
                        let (conn, netns, role) = (live.conn.into(), live.netns, live.role);
                        let owner = self.owners.get(live.owner);
                        out.push(Event::Rearm(TwRearm {
                            ts_ns: *ts_ns,
                            timer: *timer,
                            conn,
                            netns,
                            owner,
                            role,
                            from,
                            to,
                            timeout_jiffies: *timeout_jiffies,
                            seeded: false,
                        }));
                    } else if let Some(c) = conn
                        && let Some(seed) = self.seeds.get_mut(&(*netns, *c))
                    {
                        // Its timer now runs from here (inet_twsk_reschedule: TCP_TIMEWAIT_LEN,
                        // 60 s): the deadline sock_diag gave at start is past before its end.
                        seed.deadline_ns = ts_ns.saturating_add(rearm_timeout_ns(
                            *timeout_jiffies,
                            self.tw_len_jiffies,
                        ));
                        let from = std::mem::replace(&mut seed.substate, to);
                        out.push(Event::Rearm(TwRearm {
                            ts_ns: *ts_ns,
                            timer: *timer,
                            conn: *c,
                            netns: *netns,
                            owner: None,
                            role: seed.role,
                            from,
                            to,
                            timeout_jiffies: *timeout_jiffies,
                            seeded: true,
                        }));
                    }
                    return;
                }
                // A reuse's own SYN may reach a listener on this CPU right after (loopback):
                // the reuse stands. Typed loads only (the cancel carries no socket), the join is
                // by order alone, and a request socket armed on this CPU right after a
                // namespace's purge (inet_twsk_purge) looks the same: a SYN takes over only a
                // TIME_WAIT whose local port has a listener (tcp_v4_rcv's TCP_TW_SYN path),
                // never a connect()'s ephemeral port, so a connected socket's is an early end.
                KernelEvent::SynTakeover { timer, .. }
                    if *timer == p.timer && !self.unread_connected(&p) =>
                {
                    let reason = if p.reuse { Reason::Reused } else { Reason::Syn };
                    self.end(p.timer, reason, p.ts_ns, p.conn, p.netns, out);
                    return;
                }
                _ => self.end_early(p, out),
            }
        }
        match ev {
            KernelEvent::Cancel {
                timer,
                ts_ns,
                conn,
                netns,
                reuse,
                in_connect_to,
                ..
            } => {
                // The kernel could not read the socket (typed loads only): tcp_tw_reuse if the
                // connect() it happened in went to this socket's remote end.
                let reuse = reuse
                    || in_connect_to.is_some_and(|to| {
                        self.live
                            .get(timer)
                            .is_some_and(|l| Conn::from(l.conn).remote == to)
                    });
                self.pending[cpu] = Some(PendingCancel {
                    timer,
                    ts_ns,
                    reuse,
                    conn,
                    netns,
                });
            }
            // An expiry without its cancel (the cancel was lost): still an expiry.
            KernelEvent::Expire {
                timer,
                ts_ns,
                conn,
                netns,
                ..
            } => self.end(timer, Reason::Expired, ts_ns, conn, netns, out),
            KernelEvent::Rearm { .. } | KernelEvent::SynTakeover { .. } => {}
            KernelEvent::Birth {
                ts_ns,
                timer,
                conn,
                netns,
                owner,
                role,
                timeout_jiffies,
                substate,
                bound,
                ..
            } => self.on_birth(
                TwEnter {
                    ts_ns,
                    timer,
                    conn,
                    netns,
                    owner,
                    role,
                    timeout_jiffies,
                    substate: Substate::at_birth(substate, timeout_jiffies, self.tw_len_jiffies),
                    bound,
                    seeded: false,
                },
                out,
            ),
            KernelEvent::ConnectFail {
                ts_ns,
                conn,
                netns,
                owner,
                err,
                bound,
                ..
            } => out.push(Event::ConnectFail(ConnectFailure {
                ts_ns,
                conn,
                netns,
                owner,
                reason: FailReason::from_kernel(conn.local.port(), err),
                err,
                bound,
            })),
            KernelEvent::State {
                ts_ns,
                conn,
                netns,
                old_state,
                new_state,
                owner,
                role,
                skaddr,
                ..
            } => out.push(Event::State(Transition {
                ts_ns,
                conn,
                netns,
                old_state,
                new_state,
                owner,
                role,
                skaddr,
            })),
        }
    }

    fn on_birth(&mut self, enter: TwEnter, out: &mut Vec<Event>) {
        // Born between attach and the seeding dump: the birth replaces the seed (the
        // aggregator does the same by 4-tuple).
        if !self.seeds.is_empty() {
            self.seeds.remove(&(enter.netns, enter.conn));
        }
        // Timewait sockets are freed and their memory reused at once. A cancel of this timer
        // still waiting on another CPU is the death of the previous socket at this address.
        for cpu in 0..self.pending.len() {
            if self.pending[cpu]
                .as_ref()
                .is_some_and(|p| p.timer == enter.timer)
            {
                let p = self.pending[cpu].take().expect("checked");
                self.end_early(p, out);
            }
        }
        self.stats.births += 1;
        if enter.substate == Substate::FinWait2
            && hidden::may_hide(enter.timeout_jiffies, self.tw_len_jiffies)
        {
            self.checks.push(enter.timer, enter.ts_ns);
        }
        let born = Live {
            birth_ts: enter.ts_ns,
            conn: enter.conn.into(),
            netns: enter.netns,
            owner: self.owners.intern(enter.owner),
            role: enter.role,
            substate: enter.substate,
            last_cancel_ts: 0,
            last_cancel_reuse: false,
        };
        // Still alive: its death was hidden behind a cancel that looked like a re-arm (the new
        // socket's timer started right after the old one's cancel on the same CPU), or lost.
        if let Some(old) = self.live.insert(enter.timer, born) {
            self.stats.replaced += 1;
            let (ts, reuse) = if old.last_cancel_ts != 0 {
                (old.last_cancel_ts, old.last_cancel_reuse)
            } else {
                (enter.ts_ns, false)
            };
            let reason = if reuse {
                Reason::Reused
            } else {
                Reason::Killed
            };
            self.stats.exits += 1;
            out.push(Event::Exit(TwExit {
                ts_ns: ts,
                timer: enter.timer,
                conn: Some(old.conn.into()),
                netns: old.netns,
                owner: self.owners.release(old.owner),
                role: old.role,
                reason,
                lifetime_ns: Some(ts.saturating_sub(old.birth_ts)),
                substate: old.substate,
                seeded: false,
            }));
        }
        out.push(Event::Enter(enter));
    }

    /// A cancel the kernel could not read (typed loads only) of a socket that connect() made.
    fn unread_connected(&self, p: &PendingCancel) -> bool {
        p.conn.is_none()
            && self
                .live
                .get(p.timer)
                .is_some_and(|l| l.role == Role::Connected)
    }

    fn end_early(&mut self, p: PendingCancel, out: &mut Vec<Event>) {
        let reason = if p.reuse {
            Reason::Reused
        } else {
            Reason::Killed
        };
        self.end(p.timer, reason, p.ts_ns, p.conn, p.netns, out);
    }

    fn end(
        &mut self,
        timer: u64,
        reason: Reason,
        ts_ns: u64,
        conn: Option<Conn>,
        netns: u32,
        out: &mut Vec<Event>,
    ) {
        let exit = match self.live.remove(timer) {
            Some(live) => TwExit {
                ts_ns,
                timer,
                conn: Some(live.conn.into()),
                netns: live.netns,
                owner: self.owners.release(live.owner),
                role: live.role,
                reason,
                lifetime_ns: Some(ts_ns.saturating_sub(live.birth_ts)),
                substate: live.substate,
                seeded: false,
            },
            // A timer born before start whose socket the kernel could not read (typed loads
            // only): nothing says which socket ended. The seeded ones end at their deadline
            // (`settle`), so this one is not counted twice.
            None if conn.is_none() => {
                self.stats.unknown_ends += 1;
                return;
            }
            None => {
                let seed = conn.and_then(|c| self.seeds.remove(&(netns, c)));
                TwExit {
                    ts_ns,
                    timer,
                    conn,
                    netns,
                    owner: None,
                    role: seed.map_or(Role::Unknown, |s| s.role),
                    reason,
                    lifetime_ns: None,
                    substate: seed.map_or(Substate::TimeWait, |s| s.substate),
                    seeded: seed.is_some(),
                }
            }
        };
        self.stats.exits += 1;
        out.push(Event::Exit(exit));
    }

    /// Ends the cancels that nothing explained within `SETTLE_NS` of `now_ns` (monotonic), and
    /// the seeded sockets whose end was not seen `SEED_GRACE_NS` after their deadline.
    pub fn settle(&mut self, now_ns: u64, out: &mut Vec<Event>) {
        self.settle_cancels(now_ns, out);
        if self.seeds.is_empty() {
            return;
        }
        let overdue: Vec<_> = self
            .seeds
            .extract_if(|_, s| now_ns > s.deadline_ns.saturating_add(SEED_GRACE_NS))
            .collect();
        for (key, seed) in overdue {
            self.stats.overdue_seeds += 1;
            self.end_seed(key, seed, seed.deadline_ns, Reason::Expired, out);
        }
    }

    /// A seeded socket's end, its seed already taken out.
    fn end_seed(
        &mut self,
        (netns, conn): (u32, Conn),
        seed: Seed,
        ts_ns: u64,
        reason: Reason,
        out: &mut Vec<Event>,
    ) {
        self.stats.exits += 1;
        out.push(Event::Exit(TwExit {
            ts_ns,
            timer: 0,
            conn: Some(conn),
            netns,
            owner: None,
            role: seed.role,
            reason,
            lifetime_ns: None,
            substate: seed.substate,
            seeded: true,
        }));
    }

    /// The namespace `netns` was dismantled: its seeded sockets end now as `killed`. The kernel
    /// purges a dying namespace's timewait sockets (`inet_twsk_purge` from the TCP pernet
    /// exit), but with typed loads only their cancels carry no 4-tuple (`unknown_ends`), so
    /// this is how a view that started after the traffic sees them go. Only for typed loads:
    /// otherwise the purge's cancels name each socket, and ending them here would count them
    /// twice.
    pub fn end_seeds_of(&mut self, netns: u32, now_ns: u64, out: &mut Vec<Event>) {
        let ended: Vec<_> = self.seeds.extract_if(|&(n, _), _| n == netns).collect();
        for (key, seed) in ended {
            self.stats.seeds_of_gone_namespaces += 1;
            self.end_seed(key, seed, now_ns, Reason::Killed, out);
        }
    }

    fn settle_cancels(&mut self, now_ns: u64, out: &mut Vec<Event>) {
        for cpu in 0..self.pending.len() {
            if self.pending[cpu]
                .as_ref()
                .is_some_and(|p| now_ns.saturating_sub(p.ts_ns) >= SETTLE_NS)
            {
                let p = self.pending[cpu].take().expect("checked");
                self.end_early(p, out);
            }
        }
    }

    /// At shutdown: every waiting cancel is an early end.
    pub fn flush(&mut self, out: &mut Vec<Event>) {
        self.settle_cancels(u64::MAX, out);
    }

    /// The time of the oldest cancel still waiting for its explanation: the end it becomes
    /// will carry that time, so nothing later may be handed on before it (see `InOrder`).
    pub fn oldest_pending_ns(&self) -> Option<u64> {
        self.pending.iter().flatten().map(|p| p.ts_ns).min()
    }
}

/// Hands events on in time order. An end is known only once its cancel is explained (by the
/// next event from its CPU, or `SETTLE_NS` later), while other CPUs go on producing births: an
/// `EXIT ... reused` stamped 09.266 could otherwise follow an `ENTER` of 09.267. Events wait
/// here while a cancel older than them is pending; those released are sorted by time (stable).
/// Bounded: a cancel waits at most `SETTLE_NS` (`settle` runs on every batch and tick).
#[derive(Debug, Default)]
pub struct InOrder {
    held: Vec<Event>,
}

impl InOrder {
    /// Where the lifecycle puts what it resolved.
    pub fn input(&mut self) -> &mut Vec<Event> {
        &mut self.held
    }

    /// Moves to `out`, in time order, every held event older than `pending` (the oldest cancel
    /// still waiting; None: all of them).
    pub fn release(&mut self, pending: Option<u64>, out: &mut Vec<Event>) {
        if self.held.is_empty() {
            return;
        }
        self.held.sort_by_key(Event::ts_ns);
        let n = match pending {
            None => self.held.len(),
            Some(t) => self.held.partition_point(|e| e.ts_ns() < t),
        };
        out.extend(self.held.drain(..n));
    }
}

#[cfg(test)]
mod tests {
    use twtrace_common::tcp_state;

    use super::store::NO_OWNER;
    use super::*;
    use crate::kernel::decode::Process;

    fn conn(port: u16) -> Conn {
        Conn {
            local: format!("127.0.0.1:{port}").parse().unwrap(),
            remote: "127.0.0.1:80".parse().unwrap(),
        }
    }

    fn owner() -> Option<Process> {
        Some(Process {
            pid: 10,
            tid: 10,
            comm: "client".into(),
            cgroup_id: 1,
        })
    }

    fn birth(cpu: u32, ts: u64, timer: u64, port: u16) -> KernelEvent {
        birth_as(Role::Connected, cpu, ts, timer, port)
    }

    /// A birth on the listener's side: only those can a SYN take over.
    fn accepted(cpu: u32, ts: u64, timer: u64, port: u16) -> KernelEvent {
        birth_as(Role::Accepted, cpu, ts, timer, port)
    }

    fn birth_as(role: Role, cpu: u32, ts: u64, timer: u64, port: u16) -> KernelEvent {
        KernelEvent::Birth {
            netns: 0,
            cpu,
            ts_ns: ts,
            timer,
            conn: conn(port),
            owner: owner(),
            role,
            timeout_jiffies: 15000,
            substate: 6,
            bound: false,
        }
    }

    fn cancel(cpu: u32, ts: u64, timer: u64, reuse: bool) -> KernelEvent {
        KernelEvent::Cancel {
            netns: 0,
            cpu,
            ts_ns: ts,
            timer,
            conn: None,
            reuse,
            in_connect_to: None,
        }
    }

    fn run(events: Vec<KernelEvent>) -> (Vec<Event>, Lifecycle) {
        let mut lc = Lifecycle::new();
        let mut out = Vec::new();
        for e in events {
            lc.feed(e, &mut out);
        }
        (out, lc)
    }

    fn exits(out: &[Event]) -> Vec<(u64, Reason, Option<u64>)> {
        out.iter()
            .filter_map(|e| match e {
                Event::Exit(x) => Some((x.timer, x.reason, x.lifetime_ns)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn live_set_reuses_freed_records_and_returns_what_it_replaces() {
        let live = |ts: u64, port: u16| Live {
            birth_ts: ts,
            conn: conn(port).into(),
            netns: 0,
            owner: NO_OWNER,
            role: Role::Connected,
            substate: Substate::TimeWait,
            last_cancel_ts: 0,
            last_cancel_reuse: false,
        };
        let mut set = LiveSet::default();
        assert!(set.insert(0xa0, live(1, 1000)).is_none());
        assert!(set.insert(0xb0, live(2, 1001)).is_none());
        // Same timer again: the old record comes back, the set does not grow.
        let old = set.insert(0xa0, live(3, 1002)).expect("replaced");
        assert_eq!((old.birth_ts, set.len()), (1, 2));
        assert_eq!(set.remove(0xb0).map(|l| l.birth_ts), Some(2));
        assert!(set.remove(0xb0).is_none(), "removed once");
        // A new timer takes the freed record: the slab stays at two.
        assert!(set.insert(0xc0, live(4, 1003)).is_none());
        assert_eq!(set.slab.len(), 2);
        set.get_mut(0xc0).expect("alive").birth_ts = 5;
        let mut alive: Vec<(u64, u64)> = set.iter().map(|(t, l)| (t, l.birth_ts)).collect();
        alive.sort_unstable();
        assert_eq!(alive, vec![(0xa0, 3), (0xc0, 5)]);
    }

    #[test]
    fn cancel_then_expire_is_an_expiry_with_lifetime() {
        let (out, lc) = run(vec![
            birth(0, 1_000, 7, 1),
            cancel(1, 60_000_001_000, 7, false),
            KernelEvent::Expire {
                netns: 0,
                cpu: 1,
                ts_ns: 60_000_002_000,
                timer: 7,
                conn: None,
            },
        ]);
        assert_eq!(
            exits(&out),
            vec![(7, Reason::Expired, Some(60_000_001_000))]
        );
        assert_eq!(lc.live_count(), 0);
        match &out[1] {
            Event::Exit(x) => {
                assert_eq!(x.owner, owner());
                assert_eq!(x.conn, Some(conn(1)));
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn cancel_then_rearm_ends_nothing() {
        let (out, lc) = run(vec![
            birth(0, 0, 7, 1),
            cancel(0, 5, 7, false),
            KernelEvent::Rearm {
                cpu: 0,
                ts_ns: 6,
                timer: 7,
                conn: None,
                netns: 0,
                substate: 6,
                timeout_jiffies: 15000,
            },
        ]);
        assert!(exits(&out).is_empty());
        assert_eq!(lc.live_count(), 1);
        assert_eq!(lc.stats().rearms, 1);
    }

    #[test]
    fn cancel_then_syn_is_a_syn_takeover() {
        let (out, _) = run(vec![
            accepted(0, 0, 7, 1),
            cancel(1, 100, 7, false),
            KernelEvent::SynTakeover {
                cpu: 1,
                ts_ns: 101,
                timer: 7,
            },
        ]);
        assert_eq!(exits(&out), vec![(7, Reason::Syn, Some(100))]);
    }

    /// A FIN_WAIT2-substate birth is handed out for a lookup at 1 s and 6 s of age; a lookup
    /// that finds it in TIME_WAIT is a re-arm no event showed, dated from what its timer has
    /// left; one that finds it still waiting, or a socket that ended, changes nothing.
    #[test]
    fn a_lookup_finds_a_re_arm_the_timer_wheel_hid() {
        let fw2 = |timer, port| KernelEvent::Birth {
            netns: 7,
            cpu: 0,
            ts_ns: 1_000_000_000,
            timer,
            conn: conn(port),
            owner: owner(),
            role: Role::Connected,
            timeout_jiffies: 15000,
            substate: tcp_state::FIN_WAIT2,
            bound: false,
        };
        let (out, mut lc) = run(vec![fw2(7, 1000), fw2(8, 1001), birth(0, 0, 9, 1002)]);
        assert_eq!(out.len(), 3);
        assert!(lc.substate_checks(1_999_999_999).is_empty());
        let due = lc.substate_checks(2_000_000_000);
        assert_eq!(due, [(7, 7, conn(1000)), (7, 8, conn(1001))]);
        let mut out = Vec::new();
        // 7 got its FIN 10 ms after its birth: its 60 s re-arm at 1.01 s has 59,010 ms left at 2 s.
        lc.looked_up(
            due[0],
            tcp_state::TIME_WAIT,
            59_010,
            2_000_000_000,
            &mut out,
        );
        lc.looked_up(
            due[1],
            tcp_state::FIN_WAIT2,
            59_000,
            2_000_000_000,
            &mut out,
        );
        assert_eq!(out.len(), 1);
        match &out[0] {
            Event::Rearm(r) => {
                assert_eq!(
                    (r.timer, r.from, r.to),
                    (7, Substate::FinWait2, Substate::TimeWait)
                );
                assert_eq!(r.ts_ns, 1_010_000_000);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(lc.stats().hidden_rearms, 1);
        // The re-arm's own event was still in the ring: not a second re-arm.
        lc.feed(cancel(1, 1_010_000_000, 7, false), &mut out);
        lc.feed(
            KernelEvent::Rearm {
                cpu: 1,
                ts_ns: 1_010_000_001,
                timer: 7,
                conn: None,
                netns: 7,
                substate: tcp_state::TIME_WAIT,
                timeout_jiffies: 15000,
            },
            &mut out,
        );
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(lc.stats().rearms, 1);
        // Looked up again at 6 s: only 8 is still FIN_WAIT2.
        assert_eq!(lc.substate_checks(7_000_000_000), [(7, 8, conn(1001))]);
        lc.looked_up(
            due[0],
            tcp_state::TIME_WAIT,
            50_000,
            7_000_000_000,
            &mut out,
        );
        assert_eq!(out.len(), 1, "already TIME_WAIT");
    }

    /// With full loads the kernel compared the request socket's ports with the cancelled
    /// one's: the take-over stands whichever side the socket was.
    #[test]
    fn a_read_take_over_of_a_connected_socket_stands() {
        let (out, _) = run(vec![
            birth(0, 0, 7, 1),
            KernelEvent::Cancel {
                netns: 0,
                cpu: 1,
                ts_ns: 100,
                timer: 7,
                conn: Some(conn(1)),
                reuse: false,
                in_connect_to: None,
            },
            KernelEvent::SynTakeover {
                cpu: 1,
                ts_ns: 101,
                timer: 7,
            },
        ]);
        assert_eq!(exits(&out), vec![(7, Reason::Syn, Some(100))]);
    }

    #[test]
    fn cancel_followed_by_something_else_is_early() {
        let (out, _) = run(vec![
            birth(0, 0, 7, 1),
            birth(0, 0, 8, 2),
            cancel(1, 100, 7, true),
            cancel(1, 200, 8, false),
            birth(1, 300, 9, 3),
        ]);
        assert_eq!(
            exits(&out),
            vec![
                (7, Reason::Reused, Some(100)),
                (8, Reason::Killed, Some(200))
            ]
        );
    }

    #[test]
    fn a_quiet_cpu_settles_after_the_window() {
        let mut lc = Lifecycle::new();
        let mut out = Vec::new();
        lc.feed(birth(0, 0, 7, 1), &mut out);
        lc.feed(cancel(3, 1_000, 7, false), &mut out);
        lc.settle(1_000 + SETTLE_NS - 1, &mut out);
        assert!(exits(&out).is_empty());
        lc.settle(1_000 + SETTLE_NS, &mut out);
        assert_eq!(exits(&out), vec![(7, Reason::Killed, Some(1_000))]);
    }

    #[test]
    fn other_cpus_do_not_explain_a_cancel() {
        // The expire of the same timer on another CPU cannot be this cancel's expiry.
        let (out, _) = run(vec![
            birth(0, 0, 7, 1),
            cancel(0, 10, 7, false),
            KernelEvent::Rearm {
                cpu: 1,
                ts_ns: 11,
                timer: 7,
                conn: None,
                netns: 0,
                substate: 6,
                timeout_jiffies: 1,
            },
        ]);
        assert!(exits(&out).is_empty(), "still pending on cpu 0");
    }

    #[test]
    fn address_reuse_after_death_is_two_lives() {
        // Old socket at timer 7 is killed on cpu 0; its memory is reused at once by a new
        // timewait socket on cpu 0, whose start looks like a re-arm to the kernel.
        let (out, lc) = run(vec![
            birth(0, 0, 7, 1),
            cancel(0, 50, 7, false),
            KernelEvent::Rearm {
                cpu: 0,
                ts_ns: 51,
                timer: 7,
                conn: None,
                netns: 0,
                substate: 6,
                timeout_jiffies: 15000,
            },
            birth(0, 52, 7, 2),
        ]);
        assert_eq!(exits(&out), vec![(7, Reason::Killed, Some(50))]);
        assert_eq!(lc.live_count(), 1);
        assert_eq!(lc.stats().replaced, 1);
    }

    #[test]
    fn birth_at_an_address_with_a_pending_cancel_elsewhere_ends_the_old_one_first() {
        let (out, lc) = run(vec![
            birth(0, 0, 7, 1),
            cancel(0, 50, 7, true),
            birth(1, 60, 7, 2),
        ]);
        assert_eq!(exits(&out), vec![(7, Reason::Reused, Some(50))]);
        assert!(matches!(out.last(), Some(Event::Enter(e)) if e.conn == conn(2)));
        assert_eq!(lc.live_count(), 1);
    }

    #[test]
    fn ends_of_sockets_born_before_start_have_no_lifetime() {
        let c = conn(5);
        let (out, _) = run(vec![KernelEvent::Expire {
            netns: 0,
            cpu: 0,
            ts_ns: 9,
            timer: 3,
            conn: Some(c),
        }]);
        match &out[0] {
            Event::Exit(x) => {
                assert_eq!(x.conn, Some(c));
                assert_eq!(x.lifetime_ns, None);
                assert_eq!(x.owner, None);
            }
            e => panic!("{e:?}"),
        }
    }

    /// The same 4-tuple seeded in two namespaces is two sockets; an end names its namespace.
    #[test]
    fn seeds_are_per_namespace() {
        let mut lc = Lifecycle::new();
        let mut out = Vec::new();
        lc.seed(
            conn(1),
            7,
            Role::Connected,
            Substate::TimeWait,
            0,
            60_000,
            &mut out,
        );
        lc.seed(
            conn(1),
            8,
            Role::Connected,
            Substate::TimeWait,
            0,
            60_000,
            &mut out,
        );
        assert_eq!(out.len(), 2);
        out.clear();
        let mut cancel = cancel(0, 9, 77, false);
        if let KernelEvent::Cancel { netns, conn: c, .. } = &mut cancel {
            *netns = 8;
            *c = Some(conn(1));
        }
        lc.feed(cancel, &mut out);
        lc.flush(&mut out);
        assert!(
            matches!(&out[..], [Event::Exit(x)] if x.seeded && x.netns == 8),
            "{out:?}"
        );
        assert_eq!(lc.alive().map(|e| e.netns).collect::<Vec<_>>(), vec![7]);
    }

    /// A dismantled namespace's seeded sockets end as killed, at the time given; another
    /// namespace's, and a born socket's, stay.
    #[test]
    fn a_gone_namespace_kills_its_seeds_only() {
        let mut lc = Lifecycle::new();
        let mut out = Vec::new();
        for (c, netns, role) in [
            (1, 7, Role::Connected),
            (2, 7, Role::Accepted),
            (1, 8, Role::Connected),
        ] {
            lc.seed(
                conn(c),
                netns,
                role,
                Substate::FinWait2,
                0,
                60_000,
                &mut out,
            );
        }
        out.clear();
        lc.end_seeds_of(7, 5_000, &mut out);
        let mut ended: Vec<(Conn, Role, Reason, u64, bool, Substate)> = out
            .iter()
            .map(|e| match e {
                Event::Exit(x) => {
                    assert_eq!((x.netns, x.lifetime_ns, x.owner), (7, None, None));
                    (
                        x.conn.unwrap(),
                        x.role,
                        x.reason,
                        x.ts_ns,
                        x.seeded,
                        x.substate,
                    )
                }
                e => panic!("{e:?}"),
            })
            .collect();
        ended.sort_by_key(|e| e.0.local.port());
        let killed = |c, role| {
            (
                conn(c),
                role,
                Reason::Killed,
                5_000,
                true,
                Substate::FinWait2,
            )
        };
        let mut want = vec![killed(1, Role::Connected), killed(2, Role::Accepted)];
        want.sort_by_key(|e| e.0.local.port());
        assert_eq!(ended, want);
        assert_eq!(lc.stats().seeds_of_gone_namespaces, 2);
        assert_eq!(lc.stats().exits, 2);
        assert_eq!(lc.alive().map(|e| e.netns).collect::<Vec<_>>(), vec![8]);
        out.clear();
        lc.end_seeds_of(7, 6_000, &mut out);
        assert!(out.is_empty(), "ended once: {out:?}");
    }

    #[test]
    fn seeds_end_by_4_tuple_or_by_their_deadline() {
        let mut lc = Lifecycle::new();
        let mut out = Vec::new();
        lc.seed(
            conn(1),
            0,
            Role::Accepted,
            Substate::TimeWait,
            1_000,
            30_000,
            &mut out,
        );
        lc.seed(
            conn(2),
            0,
            Role::Connected,
            Substate::TimeWait,
            1_000,
            10_000,
            &mut out,
        );
        lc.seed(
            conn(2),
            0,
            Role::Connected,
            Substate::TimeWait,
            1_000,
            10_000,
            &mut out,
        );
        assert_eq!(out.len(), 2, "a 4-tuple is seeded once");
        assert!(matches!(&out[0], Event::Enter(e) if e.seeded && e.owner.is_none()));
        out.clear();
        lc.feed(
            KernelEvent::Expire {
                netns: 0,
                cpu: 0,
                ts_ns: 2_000,
                timer: 99,
                conn: Some(conn(1)),
            },
            &mut out,
        );
        match &out[0] {
            Event::Exit(x) => {
                assert!(x.seeded);
                assert_eq!(x.role, Role::Accepted);
                assert_eq!(x.lifetime_ns, None);
            }
            e => panic!("{e:?}"),
        }
        out.clear();
        // conn(2)'s end is never seen: it is taken as expired once overdue.
        let deadline = 1_000 + 10_000 * 1_000_000;
        lc.settle(deadline + SEED_GRACE_NS, &mut out);
        assert!(out.is_empty());
        lc.settle(deadline + SEED_GRACE_NS + 1, &mut out);
        assert!(matches!(&out[0], Event::Exit(x) if x.seeded && x.reason == Reason::Expired));
        assert_eq!(lc.stats().overdue_seeds, 1);
    }

    #[test]
    fn a_seeds_re_arm_moves_its_deadline() {
        // Seeded in the FIN_WAIT2 substate with 10 s left; the peer's FIN re-arms it for 60 s
        // (15,000 jiffies at HZ=250) at 5 s: overdue only 5 s after 65 s, not after 10 s.
        let mut lc = Lifecycle::new();
        lc.set_hz(Some(250));
        let mut out = Vec::new();
        let c = conn(1);
        lc.seed(
            c,
            0,
            Role::Connected,
            Substate::FinWait2,
            0,
            10_000,
            &mut out,
        );
        let s = 1_000_000_000;
        lc.feed(
            KernelEvent::Cancel {
                netns: 0,
                cpu: 0,
                ts_ns: 5 * s,
                timer: 7,
                conn: Some(c),
                reuse: false,
                in_connect_to: None,
            },
            &mut out,
        );
        lc.feed(
            KernelEvent::Rearm {
                cpu: 0,
                ts_ns: 5 * s,
                timer: 7,
                conn: Some(c),
                netns: 0,
                substate: 6,
                timeout_jiffies: 15000,
            },
            &mut out,
        );
        assert!(matches!(out.last(), Some(Event::Rearm(r)) if r.seeded));
        out.clear();
        lc.settle(10 * s + SEED_GRACE_NS + 1, &mut out);
        assert!(out.is_empty(), "{out:?}");
        lc.settle(65 * s + SEED_GRACE_NS + 1, &mut out);
        match &out[..] {
            [Event::Exit(x)] => {
                assert_eq!((x.reason, x.ts_ns), (Reason::Expired, 65 * s));
                assert_eq!(x.substate, Substate::TimeWait);
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_re_arm_lasts_its_jiffies_at_the_kernel_s_hz_else_sixty_seconds() {
        assert_eq!(rearm_timeout_ns(15000, Some(15000)), 60_000_000_000);
        assert_eq!(rearm_timeout_ns(1000, Some(60_000)), 1_000_000_000);
        assert_eq!(rearm_timeout_ns(15000, None), 60_000_000_000);
        assert_eq!(rearm_timeout_ns(0, Some(15000)), 60_000_000_000);
        // A wrapped subtraction in the kernel program: no overflow, the kernel's 60 s.
        assert_eq!(rearm_timeout_ns(u32::MAX, Some(15000)), 60_000_000_000);
    }

    #[test]
    fn a_birth_replaces_the_seed_of_the_same_4_tuple() {
        let mut lc = Lifecycle::new();
        let mut out = Vec::new();
        lc.seed(
            conn(1),
            0,
            Role::Connected,
            Substate::TimeWait,
            0,
            60_000,
            &mut out,
        );
        lc.feed(birth(0, 5, 7, 1), &mut out);
        lc.feed(cancel(0, 9, 7, false), &mut out);
        lc.flush(&mut out);
        match out.last() {
            Some(Event::Exit(x)) => {
                assert!(!x.seeded);
                assert_eq!(x.owner, owner());
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn live_entries_stay_small_and_owners_are_shared() {
        assert!(size_of::<Live>() <= 72, "{}", size_of::<Live>());
        let mut lc = Lifecycle::new();
        let mut out = Vec::new();
        for t in 1..=100 {
            lc.feed(birth(0, t, t, 1000 + t as u16), &mut out);
        }
        assert_eq!(lc.owners.index.len(), 1, "one process, one owner entry");
        for t in 1..=100 {
            lc.feed(cancel(0, 200 + t, t, false), &mut out);
        }
        lc.flush(&mut out);
        assert!(lc.owners.index.is_empty(), "released with the last socket");
        // The 4-tuple and owner come back whole at the end.
        match out.iter().rev().find(|e| matches!(e, Event::Exit(_))) {
            Some(Event::Exit(x)) => {
                assert_eq!(x.conn, Some(conn(1100)));
                assert_eq!(x.owner, owner());
            }
            e => panic!("{e:?}"),
        }
        let v6 = Conn {
            local: "[2001:db8::1]:5".parse().unwrap(),
            remote: "[::1]:6".parse().unwrap(),
        };
        assert_eq!(Conn::from(PackedConn::from(v6)), v6);
    }

    #[test]
    fn flush_ends_everything_pending() {
        let mut lc = Lifecycle::new();
        let mut out = Vec::new();
        lc.feed(birth(0, 0, 7, 1), &mut out);
        lc.feed(cancel(1, 5, 7, false), &mut out);
        lc.flush(&mut out);
        assert_eq!(exits(&out).len(), 1);
    }

    /// Typed loads only: a cancel inside a connect() is a reuse when that connect() went to
    /// the socket's remote end, and the reuse stands even if a SYN take-over event follows (the
    /// reusing connection's own SYN reaching the listener); one to elsewhere followed by a
    /// reqsk start is a SYN take-over of a listener's side socket, and of a connected one (a
    /// purge's cancel, then some SYN on this CPU) an early end.
    #[test]
    fn a_cancel_inside_a_connect_is_a_reuse_only_towards_the_remote_end() {
        let in_connect = |timer, to: &str| KernelEvent::Cancel {
            netns: 0,
            cpu: 0,
            ts_ns: 5,
            timer,
            conn: None,
            reuse: false,
            in_connect_to: Some(to.parse().unwrap()),
        };
        let syn = |timer| KernelEvent::SynTakeover {
            cpu: 0,
            ts_ns: 6,
            timer,
        };
        let (out, _) = run(vec![
            birth(0, 1, 7, 1000),
            in_connect(7, "127.0.0.1:80"),
            syn(7),
            accepted(0, 2, 8, 1001),
            in_connect(8, "127.0.0.1:9999"),
            syn(8),
            birth(0, 3, 9, 1002),
            in_connect(9, "127.0.0.1:9999"),
            syn(9),
            accepted(0, 4, 10, 1003),
            in_connect(10, "127.0.0.1:9999"),
        ]);
        let reasons: Vec<(u64, Reason)> = exits(&out).iter().map(|&(t, r, _)| (t, r)).collect();
        assert_eq!(
            reasons,
            [(7, Reason::Reused), (8, Reason::Syn), (9, Reason::Killed)],
            "a connected socket's ephemeral port has no listener; 10's cancel waits for what \
             follows: {out:?}"
        );
    }

    /// Typed loads only: a birth whose substate the kernel could not read is told by its
    /// timeout: 60 s is TIME_WAIT, anything else (tcp_fin_timeout) FIN_WAIT2.
    #[test]
    fn an_unread_substate_is_told_by_the_timeout() {
        let hz = Some(250 * 60);
        assert_eq!(Substate::at_birth(0, 15000, hz), Substate::TimeWait);
        assert_eq!(
            Substate::at_birth(0, 14999, hz),
            Substate::TimeWait,
            "a tick"
        );
        assert_eq!(Substate::at_birth(0, 1250, hz), Substate::FinWait2);
        assert_eq!(Substate::at_birth(0, 1250, None), Substate::TimeWait);
        assert_eq!(
            Substate::at_birth(tcp_state::FIN_WAIT2, 15000, hz),
            Substate::FinWait2,
            "what the kernel read wins"
        );
    }

    /// Typed loads only: the end of a timer nobody saw born carries no socket, and is not
    /// counted (the seeded sockets end at their deadline instead).
    #[test]
    fn an_end_of_an_unknown_unread_timer_is_not_an_exit() {
        let (out, lc) = run(vec![cancel(0, 1, 42, false), birth(0, 2, 7, 1000)]);
        assert!(exits(&out).is_empty(), "{out:?}");
        assert_eq!(lc.stats().unknown_ends, 1);
    }

    /// A reuse cancel on CPU 0 waits for its explanation while CPU 1 goes on: the later birth
    /// is held back until the end is known, then both come out in time order.
    #[test]
    fn ends_come_out_before_later_births() {
        let mut lc = Lifecycle::new();
        let mut order = InOrder::default();
        let mut out = Vec::new();
        let mut step = |lc: &mut Lifecycle, order: &mut InOrder, ev: Option<KernelEvent>, now| {
            if let Some(ev) = ev {
                lc.feed(ev, order.input());
            }
            lc.settle(now, order.input());
            order.release(lc.oldest_pending_ns(), &mut out);
        };
        step(
            &mut lc,
            &mut order,
            Some(birth(0, 1_000, 0xa0, 40000)),
            1_000,
        );
        // 09.266: connect() on CPU 0 takes the 4-tuple over; 09.267: a birth on CPU 1.
        step(
            &mut lc,
            &mut order,
            Some(cancel(0, 9_266_000_000, 0xa0, true)),
            9_266_000_001,
        );
        step(
            &mut lc,
            &mut order,
            Some(birth(1, 9_267_000_000, 0xb0, 40001)),
            9_267_000_001,
        );
        // Nothing more from CPU 0: the cancel settles as an early end (reused).
        step(&mut lc, &mut order, None, 9_266_000_000 + SETTLE_NS);
        let seen: Vec<(u64, &str)> = out
            .iter()
            .map(|e| {
                let kind = match e {
                    Event::Enter(_) => "enter",
                    Event::Exit(_) => "exit",
                    Event::State(_) | Event::Rearm(_) | Event::ConnectFail(_) => "other",
                };
                (e.ts_ns(), kind)
            })
            .collect();
        assert_eq!(
            seen,
            vec![
                (1_000, "enter"),
                (9_266_000_000, "exit"),
                (9_267_000_000, "enter")
            ]
        );
        assert_eq!(exits(&out)[0].1, Reason::Reused);
    }
}
