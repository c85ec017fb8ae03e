//! Re-arms the timer wheel hides. A timewait socket born in the FIN_WAIT2 substate becomes
//! TIME_WAIT when the peer's FIN comes, and `inet_twsk_reschedule()` re-arms its timer with
//! `mod_timer_pending()`. When the new expiry falls in the wheel bucket the timer already sits
//! in, `__mod_timer()` only updates `timer->expires`: no `timer_cancel`, no `timer_start`, so no
//! event. At 60 s a bucket spans 2.048 s at HZ 250, 4.096 s at HZ 1000, 5.12 s at HZ 100
//! (kernel/time/timer.c, `LVL_GRAN`); with the default `tcp_fin_timeout` (60 s, TIME_WAIT's own
//! length), a FIN that comes within that much of the birth is never seen.
//!
//! So each FIN_WAIT2-substate birth is looked up in the kernel (sock_diag, by its 4-tuple) at
//! 1 s and again at 6 s of age, past the widest bucket: whichever hidden re-arm happened by
//! then is found, and one after that moves the expiry out of its bucket and shows.

use std::collections::VecDeque;

/// Ages at which a FIN_WAIT2-substate socket is looked up, in ns.
pub const CHECK_AGES_NS: [u64; 2] = [1_000_000_000, 6_000_000_000];

/// Whether a re-arm of a FIN_WAIT2-substate timer armed for `timeout_jiffies` can stay in its
/// bucket: the re-arm sets 60 s from the FIN, so only when the first timeout was within a
/// bucket (at most 5.12 s) of 60 s. `tcp_fin_timeout` cannot be longer (a longer one keeps the
/// full socket on its keepalive timer, tcp_rcv_state_process), and with a shorter one (case
/// 18's 15 s) every re-arm moves the timer and shows. `tw_len_jiffies`: 60 s in jiffies (None:
/// CONFIG_HZ unknown, so always).
pub fn may_hide(timeout_jiffies: u32, tw_len_jiffies: Option<u32>) -> bool {
    tw_len_jiffies.is_none_or(|len| {
        // 6 s in jiffies, past the widest bucket.
        let margin = len / 10;
        timeout_jiffies.saturating_add(margin) >= len
    })
}

/// How many lookups one call hands out at most (the rest wait for the next call).
const MAX_PER_CALL: usize = 4096;

/// How many births one round's queue holds at most: past it the oldest are dropped unlooked
/// (`skipped`), so a flood of FIN_WAIT2 births, or a collector that stopped answering, cannot
/// grow memory without bound.
const MAX_QUEUED: usize = 1 << 16;

#[derive(Debug, Clone, Copy)]
struct Due {
    timer: u64,
    birth_ts: u64,
}

/// FIN_WAIT2-substate births waiting for their lookups, one queue per check, in birth order.
#[derive(Debug, Default)]
pub(super) struct Checks {
    queues: [VecDeque<Due>; 2],
    /// Births dropped unlooked because a queue was full.
    pub(super) skipped: u64,
}

impl Checks {
    pub(super) fn push(&mut self, timer: u64, birth_ts: u64) {
        self.push_to(0, Due { timer, birth_ts });
    }

    fn push_to(&mut self, round: usize, d: Due) {
        let q = &mut self.queues[round];
        if q.len() >= MAX_QUEUED {
            q.pop_front();
            self.skipped += 1;
        }
        q.push_back(d);
    }

    /// The `(timer, birth_ts)` of the births whose next check is due at `now_ns`, at most
    /// `MAX_PER_CALL`; those past their first check wait for the second. A birth `keep` turns
    /// down (ended, or known to be TIME_WAIT now) leaves the queues without a lookup.
    pub(super) fn due(&mut self, now_ns: u64, keep: impl Fn(u64, u64) -> bool) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        // The last round first: a birth moved on to it now waits for its own age there.
        for (round, age) in CHECK_AGES_NS.iter().enumerate().rev() {
            while out.len() < MAX_PER_CALL
                && let Some(d) = self.queues[round].front().copied()
                && d.birth_ts.saturating_add(*age) <= now_ns
            {
                self.queues[round].pop_front();
                if !keep(d.timer, d.birth_ts) {
                    continue;
                }
                out.push((d.timer, d.birth_ts));
                if round + 1 < self.queues.len() {
                    self.push_to(round + 1, d);
                }
            }
        }
        out
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queues.iter().all(VecDeque::is_empty)
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.queues.iter().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Checks {
        fn due_all(&mut self, now_ns: u64) -> Vec<(u64, u64)> {
            self.due(now_ns, |_, _| true)
        }
    }

    #[test]
    fn a_birth_turned_down_leaves_both_queues() {
        let mut c = Checks::default();
        c.push(1, 0);
        c.push(2, 0);
        assert_eq!(c.due(1_000_000_000, |t, _| t == 2), [(2, 0)]);
        assert_eq!(c.due_all(u64::MAX), [(2, 0)]);
        assert!(c.is_empty());
    }

    #[test]
    fn a_full_queue_drops_its_oldest() {
        let mut c = Checks::default();
        for t in 0..(MAX_QUEUED as u64 + 2) {
            c.push(t, t);
        }
        assert_eq!(c.skipped, 2);
        assert_eq!(c.len(), MAX_QUEUED);
        assert_eq!(c.due_all(1_000_000_002)[0], (2, 2));
    }

    #[test]
    fn only_a_timeout_near_60_s_can_hide_its_re_arm() {
        let hz250 = Some(15000);
        assert!(may_hide(15000, hz250));
        assert!(may_hide(13500, hz250), "54 s");
        assert!(!may_hide(13499, hz250));
        assert!(!may_hide(3750, hz250), "tcp_fin_timeout 15 s");
        assert!(may_hide(3750, None));
    }

    #[test]
    fn each_birth_is_due_at_one_then_six_seconds() {
        let mut c = Checks::default();
        c.push(1, 0);
        c.push(2, 500_000_000);
        assert!(c.due_all(999_999_999).is_empty());
        assert_eq!(c.due_all(1_000_000_000), [(1, 0)]);
        assert_eq!(c.due_all(2_000_000_000), [(2, 500_000_000)]);
        assert!(c.due_all(5_999_999_999).is_empty());
        assert_eq!(c.due_all(7_000_000_000), [(1, 0), (2, 500_000_000)]);
        assert!(c.due_all(u64::MAX).is_empty());
        assert_eq!(c.len(), 0);
    }

    /// At the end every birth still waiting is handed out once.
    #[test]
    fn everything_waiting_comes_out_once_at_the_end() {
        let mut c = Checks::default();
        c.push(1, 0);
        c.push(2, 10);
        assert_eq!(c.due_all(1_000_000_000), [(1, 0)]);
        assert_eq!(c.due_all(u64::MAX), [(1, 0), (2, 10)]);
        assert_eq!(
            c.len(),
            1,
            "2 still waits for its second look (never asked again)"
        );
    }
}
