//! The kernel's own TIME_WAIT accounting, read from /proc: TcpExt counters (/proc/net/netstat)
//! and the sockets alive now (/proc/net/sockstat). These are the ground truth twtrace's figures
//! are shown beside. Parsing is pure and unit-tested; reading is a thin layer over it.

use std::{collections::HashMap, fs};

use super::netns::proc_net;

/// TcpExt counters that concern TIME_WAIT (/proc/net/netstat). Since Linux 5.18, `TW` counts
/// timewait sockets *created* (not expired); `TWKilled` those created with a timeout of 4 s or
/// less (before 5.18 both counted them when their timer expired, and not at all when they ended
/// early: 27dd35e02235 moved the counting to the timer's first arming); `TWRecycled` local reuse by tcp_tw_reuse; `TCPTimeWaitOverflow` TIME_WAIT skipped
/// because tcp_max_tw_buckets was full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TwCounters {
    pub created: u64,
    pub killed: u64,
    pub recycled: u64,
    pub overflow: u64,
    /// `TCPAbortOnData`: resets sent by a close with SO_LINGER set to zero, or because data
    /// arrived after the socket was shut down (net/ipv4/tcp.c `tcp_close`, tcp_input.c).
    pub abort_on_data: u64,
    /// `TCPAbortOnClose`: resets sent by a close() that left received data unread.
    pub abort_on_close: u64,
}

impl TwCounters {
    pub fn since(&self, start: &TwCounters) -> TwCounters {
        TwCounters {
            created: self.created.saturating_sub(start.created),
            killed: self.killed.saturating_sub(start.killed),
            recycled: self.recycled.saturating_sub(start.recycled),
            overflow: self.overflow.saturating_sub(start.overflow),
            abort_on_data: self.abort_on_data.saturating_sub(start.abort_on_data),
            abort_on_close: self.abort_on_close.saturating_sub(start.abort_on_close),
        }
    }
}

pub fn parse_netstat(text: &str, prefix: &str) -> HashMap<String, u64> {
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
    let mut out = HashMap::new();
    if let [names, values, ..] = lines.as_slice() {
        for (k, v) in names
            .split_whitespace()
            .skip(1)
            .zip(values.split_whitespace().skip(1))
        {
            if let Ok(v) = v.parse() {
                out.insert(k.to_owned(), v);
            }
        }
    }
    out
}

pub fn tw_counters_from(netstat: &str) -> TwCounters {
    let m = parse_netstat(netstat, "TcpExt:");
    let get = |k: &str| m.get(k).copied().unwrap_or(0);
    TwCounters {
        created: get("TW"),
        killed: get("TWKilled"),
        recycled: get("TWRecycled"),
        overflow: get("TCPTimeWaitOverflow"),
        abort_on_data: get("TCPAbortOnData"),
        abort_on_close: get("TCPAbortOnClose"),
    }
}

/// `tw` of /proc/net/sockstat: timewait sockets alive now (in the reader's network namespace;
/// the FIN_WAIT2 substate included).
pub fn sockstat_tw_from(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let i = f.iter().position(|&x| x == "tw")?;
    f.get(i + 1)?.parse().ok()
}

/// The calling thread's namespace's TcpExt counters (zero when unreadable).
pub fn tw_counters() -> TwCounters {
    fs::read_to_string(proc_net().join("netstat"))
        .map(|t| tw_counters_from(&t))
        .unwrap_or_default()
}

/// The calling thread's namespace's sockstat `tw`.
pub fn sockstat_tw() -> Option<u64> {
    fs::read_to_string(proc_net().join("sockstat"))
        .ok()
        .and_then(|t| sockstat_tw_from(&t))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NETSTAT: &str = "TcpExt: SyncookiesSent TW TWRecycled TWKilled TCPTimeWaitOverflow\n\
                           TcpExt: 0 81713 4 2 3\n\
                           IpExt: InNoRoutes\nIpExt: 0\n";

    #[test]
    fn counters_from_netstat() {
        let c = tw_counters_from(NETSTAT);
        assert_eq!(
            c,
            TwCounters {
                created: 81713,
                killed: 2,
                recycled: 4,
                overflow: 3,
                abort_on_data: 0,
                abort_on_close: 0,
            }
        );
        let later = TwCounters {
            created: 81720,
            ..c
        };
        assert_eq!(later.since(&c).created, 7);
        assert_eq!(tw_counters_from(""), TwCounters::default());
    }

    #[test]
    fn sockstat() {
        let t = "sockets: used 200\nTCP: inuse 5 orphan 0 tw 23 alloc 8 mem 1\nUDP: inuse 1\n";
        assert_eq!(sockstat_tw_from(t), Some(23));
        assert_eq!(sockstat_tw_from("TCP: inuse 5\n"), None);
    }
}
