//! The kernel's own figures for one network namespace (TcpExt, sockstat, the settings), and a
//! ledger of them over a run: the first reading of each namespace is its baseline, so "since
//! start" figures are per namespace too.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{
    counters::{self, TwCounters},
    settings::{self, Settings},
};

/// What the kernel says in one namespace now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsFigures {
    /// TcpExt counters (/proc/net/netstat), since boot.
    pub counters: TwCounters,
    /// Timewait sockets alive now (/proc/net/sockstat `tw`).
    pub sockstat_tw: Option<u64>,
    pub settings: Settings,
}

/// The figures of the calling thread's namespace.
pub fn read_here() -> NsFigures {
    NsFigures {
        counters: counters::tw_counters(),
        sockstat_tw: counters::sockstat_tw(),
        settings: settings::settings(),
    }
}

/// Per-namespace figures over a run.
#[derive(Debug, Default)]
pub struct Ledger {
    baseline: HashMap<u32, TwCounters>,
    latest: HashMap<u32, NsFigures>,
}

impl Ledger {
    /// A reading of one namespace; its first becomes its baseline.
    pub fn record(&mut self, netns: u32, figures: NsFigures) {
        self.baseline.entry(netns).or_insert(figures.counters);
        self.latest.insert(netns, figures);
    }

    pub fn latest(&self, netns: u32) -> Option<&NsFigures> {
        self.latest.get(&netns)
    }

    /// TcpExt counters since the namespace's first reading.
    pub fn since_start(&self, netns: u32) -> Option<TwCounters> {
        let start = self.baseline.get(&netns)?;
        Some(self.latest.get(&netns)?.counters.since(start))
    }

    /// A namespace that is gone: nothing of it is kept.
    pub fn forget(&mut self, netns: u32) {
        self.baseline.remove(&netns);
        self.latest.remove(&netns);
    }

    pub fn len(&self) -> usize {
        self.latest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_start_is_per_namespace_from_its_first_reading() {
        let mut l = Ledger::default();
        let at = |created, overflow| NsFigures {
            counters: TwCounters {
                created,
                overflow,
                ..TwCounters::default()
            },
            ..NsFigures::default()
        };
        l.record(1, at(100, 5));
        l.record(2, at(7, 0));
        l.record(1, at(150, 9));
        assert_eq!(
            l.since_start(1).map(|c| (c.created, c.overflow)),
            Some((50, 4))
        );
        assert_eq!(l.since_start(2).map(|c| c.created), Some(0));
        l.forget(1);
        assert_eq!(l.since_start(1), None);
        l.record(1, at(3, 0));
        assert_eq!(
            l.since_start(1).map(|c| c.created),
            Some(0),
            "a new baseline"
        );
    }
}
