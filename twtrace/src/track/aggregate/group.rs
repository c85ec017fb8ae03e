//! One group's figures: TIME_WAIT now (per substate), births, ends per reason, failed
//! connects, a ring of births per second for the rate windows, a lifetime histogram, and its
//! recent owners.

use super::OWNERS_PER_GROUP;
use crate::{
    kernel::decode::{Comm, Process},
    track::lifecycle::{FailReason, Reason, Substate},
};

/// Seconds the rate ring keeps: the 60 complete seconds of the longest window, and the one
/// being counted.
pub(super) const RATE_SLOTS: u64 = 61;

/// Births per second over the last minute, one slot per second, rotated lazily.
#[derive(Clone, Debug)]
pub(super) struct RateRing {
    pub(super) slots: [u32; RATE_SLOTS as usize],
    /// The second (monotonic) that `slots[head % RATE_SLOTS]` counts.
    pub(super) head: u64,
    /// The earliest second ever counted (u64::MAX: none): every slot before it is 0. Folding
    /// a group reads only from there (with client sockets grouped by local port, most groups
    /// folded hold one birth: one slot instead of 61).
    pub(super) first: u64,
}

impl Default for RateRing {
    fn default() -> Self {
        Self {
            slots: [0; RATE_SLOTS as usize],
            head: 0,
            first: u64::MAX,
        }
    }
}

impl RateRing {
    pub(super) fn slot(sec: u64) -> usize {
        (sec % RATE_SLOTS) as usize
    }

    pub(super) fn advance(&mut self, sec: u64) {
        if sec <= self.head {
            return;
        }
        let steps = (sec - self.head).min(RATE_SLOTS);
        for i in 1..=steps {
            self.slots[Self::slot(self.head + i)] = 0;
        }
        self.head = sec;
    }

    pub(super) fn record(&mut self, sec: u64) {
        self.advance(sec);
        if self.head - sec < RATE_SLOTS {
            let slot = &mut self.slots[Self::slot(sec)];
            *slot = slot.saturating_add(1);
            self.first = self.first.min(sec);
        }
    }

    /// Births per second over the `window` complete seconds before `now_sec` (1 to 60).
    pub(super) fn rate(&self, now_sec: u64, window: u64) -> f64 {
        let window = window.clamp(1, RATE_SLOTS - 1);
        let mut sum = 0u64;
        for s in now_sec.saturating_sub(window)..now_sec {
            if s <= self.head && self.head - s < RATE_SLOTS {
                sum += self.slots[Self::slot(s)] as u64;
            }
        }
        sum as f64 / window as f64
    }

    pub(super) fn merge(&mut self, other: &RateRing) {
        if other.first == u64::MAX {
            return;
        }
        let head = self.head.max(other.head);
        self.advance(head);
        self.first = self.first.min(other.first);
        for s in head.saturating_sub(RATE_SLOTS - 1).max(other.first)..=head {
            if s <= other.head && other.head - s < RATE_SLOTS {
                let v = other.slots[Self::slot(s)];
                let slot = &mut self.slots[Self::slot(s)];
                *slot = slot.saturating_add(v);
            }
        }
    }
}

/// Lifetimes in ms, log-linear buckets with 64 sub-buckets per power of two (at most 1.6 %
/// error), kept sparse: TIME_WAIT lifetimes cluster in a handful of buckets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lifetimes {
    pub(super) buckets: Vec<(u16, u32)>,
    pub(super) count: u64,
    pub(super) max_ms: u64,
}

pub(super) fn bucket_of(ms: u64) -> u16 {
    if ms < 64 {
        return ms as u16;
    }
    let k = 63 - ms.leading_zeros() as u64 - 6;
    let m = ms >> k;
    (64 + k * 64 + (m - 64)).min(u16::MAX as u64) as u16
}

/// (lowest, highest) ms of a bucket.
pub(super) fn bucket_range(b: u16) -> (u64, u64) {
    let b = b as u64;
    if b < 64 {
        return (b, b);
    }
    let k = (b - 64) / 64;
    let m = 64 + (b - 64) % 64;
    (m << k, ((m + 1) << k) - 1)
}

impl Lifetimes {
    pub fn record(&mut self, ms: u64) {
        let b = bucket_of(ms);
        match self.buckets.binary_search_by_key(&b, |&(k, _)| k) {
            Ok(i) => self.buckets[i].1 = self.buckets[i].1.saturating_add(1),
            Err(i) => self.buckets.insert(i, (b, 1)),
        }
        self.count += 1;
        self.max_ms = self.max_ms.max(ms);
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn max_ms(&self) -> Option<u64> {
        (self.count > 0).then_some(self.max_ms)
    }

    /// The q-quantile (0..=1), as the middle of its bucket, never above the maximum.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for &(b, n) in &self.buckets {
            seen += n as u64;
            if seen >= rank {
                let (lo, hi) = bucket_range(b);
                return Some(((lo + hi) / 2).min(self.max_ms));
            }
        }
        Some(self.max_ms)
    }

    /// How many lifetimes were at most `ms` (exact at bucket edges, else a bucket's worth).
    pub fn count_le(&self, ms: u64) -> u64 {
        self.buckets
            .iter()
            .take_while(|&&(b, _)| bucket_range(b).1 <= ms)
            .map(|&(_, n)| n as u64)
            .sum()
    }

    pub(super) fn merge(&mut self, other: &Lifetimes) {
        for &(b, n) in &other.buckets {
            match self.buckets.binary_search_by_key(&b, |&(k, _)| k) {
                Ok(i) => self.buckets[i].1 = self.buckets[i].1.saturating_add(n),
                Err(i) => self.buckets.insert(i, (b, n)),
            }
        }
        self.count += other.count;
        self.max_ms = self.max_ms.max(other.max_ms);
    }
}

pub(super) fn reason_index(r: Reason) -> usize {
    match r {
        Reason::Expired => 0,
        Reason::Reused => 1,
        Reason::Syn => 2,
        Reason::Killed => 3,
    }
}

pub const REASONS: [Reason; 4] = [Reason::Expired, Reason::Reused, Reason::Syn, Reason::Killed];

/// What twtrace knows about one group.
#[derive(Clone, Debug, Default)]
pub struct Group {
    /// Timewait sockets born (both substates).
    pub entered: u64,
    pub exited: u64,
    /// Timewait sockets now in the TIME_WAIT substate (`ss state time-wait`).
    pub in_time_wait: u64,
    /// Timewait sockets now in the FIN_WAIT2 substate: closed first, the peer's FIN not in yet
    /// (`ss state fin-wait-2` lists them; sockstat's `tw` counts both kinds).
    pub in_fin_wait2: u64,
    /// Indexed like `REASONS`.
    pub exits: [u64; 4],
    /// connect() calls that never connected, indexed like `FailReason::ALL`.
    pub connect_failures: [u64; 6],
    pub(super) rates: RateRing,
    pub lifetimes: Lifetimes,
    /// Most recent distinct owners (pid, comm), newest last.
    pub owners: Vec<(u32, Comm)>,
    /// cgroup id of the most recent owner (resolved to a unit or container by the views).
    pub cgroup_id: Option<u64>,
}

/// Groups summed into one (the rows of a report past its `--top`, with `other`): counts,
/// rates, lifetimes and failures add up; owners are left out.
pub fn merge<'a>(groups: impl IntoIterator<Item = &'a Group>) -> Group {
    let mut sum = Group::default();
    for g in groups {
        sum.absorb(g);
    }
    sum
}

impl Group {
    /// Back to a new group's state, keeping the vectors' memory (a reused group allocates
    /// nothing).
    pub(super) fn reset(&mut self) {
        let mut owners = std::mem::take(&mut self.owners);
        let mut buckets = std::mem::take(&mut self.lifetimes.buckets);
        owners.clear();
        buckets.clear();
        *self = Group::default();
        self.owners = owners;
        self.lifetimes.buckets = buckets;
    }

    /// The counter of timewait sockets in `substate`.
    pub(super) fn holding(&mut self, substate: Substate) -> &mut u64 {
        match substate {
            Substate::TimeWait => &mut self.in_time_wait,
            Substate::FinWait2 => &mut self.in_fin_wait2,
        }
    }

    /// Timewait sockets now, both substates (what sockstat's `tw` counts).
    pub fn timewait(&self) -> u64 {
        self.in_time_wait + self.in_fin_wait2
    }

    pub fn connect_failed(&self) -> u64 {
        self.connect_failures.iter().sum()
    }

    pub(super) fn enter(
        &mut self,
        sec: u64,
        owner: Option<&Process>,
        counted: bool,
        substate: Substate,
    ) {
        *self.holding(substate) += 1;
        if counted {
            self.entered += 1;
            self.rates.record(sec);
        }
        self.saw(owner);
    }

    pub(super) fn saw(&mut self, owner: Option<&Process>) {
        if let Some(p) = owner {
            self.cgroup_id = Some(p.cgroup_id);
            let this = (p.pid, p.comm);
            if self.owners.last() == Some(&this) {
                return;
            }
            if let Some(i) = self.owners.iter().position(|o| *o == this) {
                self.owners.remove(i);
            } else if self.owners.len() == OWNERS_PER_GROUP {
                self.owners.remove(0);
            }
            self.owners.push(this);
        }
    }

    pub(super) fn leave(&mut self, substate: Substate) {
        let n = self.holding(substate);
        *n = n.saturating_sub(1);
    }

    pub(super) fn exit(&mut self, reason: Reason, lifetime_ms: Option<u64>, substate: Substate) {
        self.leave(substate);
        self.exited += 1;
        self.exits[reason_index(reason)] += 1;
        if let Some(ms) = lifetime_ms {
            self.lifetimes.record(ms);
        }
    }

    pub(super) fn rearm(&mut self, from: Substate, to: Substate) {
        if from != to {
            self.leave(from);
            *self.holding(to) += 1;
        }
    }

    pub(super) fn fail(&mut self, reason: FailReason, owner: Option<&Process>) {
        self.connect_failures[reason.index()] += 1;
        self.saw(owner);
    }

    pub(super) fn absorb(&mut self, g: &Group) {
        self.entered += g.entered;
        self.exited += g.exited;
        self.in_time_wait += g.in_time_wait;
        self.in_fin_wait2 += g.in_fin_wait2;
        for i in 0..4 {
            self.exits[i] += g.exits[i];
        }
        for (a, b) in self.connect_failures.iter_mut().zip(g.connect_failures) {
            *a += b;
        }
        self.rates.merge(&g.rates);
        self.lifetimes.merge(&g.lifetimes);
    }

    /// Births per second over the last `window` seconds (1 to 60) before `now_sec`.
    pub fn rate(&self, now_sec: u64, window: u64) -> f64 {
        self.rates.rate(now_sec, window)
    }

    pub fn exits_by(&self, r: Reason) -> u64 {
        self.exits[reason_index(r)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(secs: &[u64]) -> RateRing {
        let mut r = RateRing::default();
        for &s in secs {
            r.record(s);
        }
        r
    }

    /// Births per second over each window, counted from the list of birth seconds itself.
    fn expected(secs: &[u64], now: u64, window: u64) -> f64 {
        let n = secs
            .iter()
            .filter(|&&s| s < now && s >= now.saturating_sub(window))
            .count();
        n as f64 / window as f64
    }

    #[test]
    fn merging_reads_only_what_a_ring_counted_and_sums_like_one_ring() {
        let a = [100, 130, 130, 159, 161];
        let b = [150, 160, 162];
        let mut m = ring(&a);
        m.merge(&ring(&b));
        // Merged the other way round, and into an empty ring (the `other` group's first fold).
        let mut n = ring(&b);
        n.merge(&ring(&a));
        let mut e = RateRing::default();
        e.merge(&ring(&a));
        e.merge(&ring(&b));
        let all: Vec<u64> = a.iter().chain(&b).copied().collect();
        // Asked as the views ask: for seconds at or after the newest counted.
        for now in [163, 170, 200, 222, 230] {
            for window in [1, 10, 60] {
                let want = expected(&all, now, window);
                assert_eq!(m.rate(now, window), want, "now {now} window {window}");
                assert_eq!(n.rate(now, window), want, "now {now} window {window}");
                assert_eq!(e.rate(now, window), want, "now {now} window {window}");
            }
        }
        assert_eq!(m.first, 100);
        // An empty ring adds nothing and moves nothing.
        let before = m.clone();
        m.merge(&RateRing::default());
        assert_eq!(
            (m.slots, m.head, m.first),
            (before.slots, before.head, before.first)
        );
    }
}
