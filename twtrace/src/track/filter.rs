//! What the user asked to see: `--port`, `--peer`, `--pid`, `--comm`, `-4`/`-6`. Pure.

use std::{fmt, net::IpAddr, str::FromStr};

use crate::{
    kernel::decode::Conn,
    track::lifecycle::{Event, TwEnter},
};

/// An IP network, `ADDR/LEN` or a bare address (a single host).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => mask_eq(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => mask_eq(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

fn mask_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = (prefix / 8) as usize;
    let rest = prefix % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[full] & mask == b[full] & mask
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr_s, prefix_s) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr_s
            .parse()
            .map_err(|_| format!("'{s}' is not an IP address or CIDR (like 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_s {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max && p.chars().all(|c| c.is_ascii_digit()) => n,
                _ => return Err(format!("'{s}': prefix length must be 0 to {max}")),
            },
        };
        let net = Cidr { addr, prefix };
        // Checked as typed, so that a message names what the user wrote.
        if !net.contains_exactly_network() {
            return Err(format!(
                "'{s}' has host bits set; did you mean {}?",
                net.network().typed()
            ));
        }
        // An IPv4-mapped address is shown (and matched) as IPv4.
        Ok(match addr {
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) if prefix >= 96 => Cidr {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                },
                _ => net,
            },
            IpAddr::V4(_) => net,
        })
    }
}

impl Cidr {
    /// As the user would write it: a v4-mapped network keeps its `::ffff:` form.
    fn typed(&self) -> String {
        match self.addr {
            IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
                format!(
                    "::ffff:{}/{}",
                    v6.to_ipv4_mapped().expect("mapped"),
                    self.prefix
                )
            }
            _ => self.to_string(),
        }
    }

    fn network(&self) -> Cidr {
        let zero = |octets: &mut [u8]| {
            for (i, b) in octets.iter_mut().enumerate() {
                let bit = (i * 8) as u8;
                if bit >= self.prefix {
                    *b = 0;
                } else if self.prefix - bit < 8 {
                    *b &= 0xffu8 << (8 - (self.prefix - bit));
                }
            }
        };
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let mut o = a.octets();
                zero(&mut o);
                IpAddr::from(o)
            }
            IpAddr::V6(a) => {
                let mut o = a.octets();
                zero(&mut o);
                IpAddr::from(o)
            }
        };
        Cidr {
            addr,
            prefix: self.prefix,
        }
    }

    fn contains_exactly_network(&self) -> bool {
        self.network().addr == self.addr
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Local or remote port, any of them.
    pub ports: Vec<u16>,
    /// Remote address inside any of them.
    pub peers: Vec<Cidr>,
    pub pids: Vec<u32>,
    /// Exact process names (the kernel's 15-character comm).
    pub comms: Vec<String>,
    /// Some(4) or Some(6) to keep one family.
    pub family: Option<u8>,
    /// Network namespaces (inode numbers), any of them.
    pub netns: Vec<u32>,
}

impl Filter {
    pub fn matches_conn(&self, conn: &Conn) -> bool {
        (self.ports.is_empty()
            || self
                .ports
                .iter()
                .any(|&p| conn.local.port() == p || conn.remote.port() == p))
            && (self.peers.is_empty() || self.peers.iter().any(|c| c.contains(conn.remote.ip())))
            && self.family.is_none_or(|f| conn.family() == f)
    }

    pub fn matches_owner(&self, pid: Option<u32>, comm: Option<&str>) -> bool {
        (self.pids.is_empty() || pid.is_some_and(|p| self.pids.contains(&p)))
            && (self.comms.is_empty() || comm.is_some_and(|c| self.comms.iter().any(|x| x == c)))
    }

    pub fn matches_netns(&self, netns: u32) -> bool {
        self.netns.is_empty() || self.netns.contains(&netns)
    }

    pub fn matches_enter(&self, e: &TwEnter) -> bool {
        self.matches_netns(e.netns)
            && self.matches_conn(&e.conn)
            && self.matches_owner(
                e.owner.as_ref().map(|o| o.pid),
                e.owner.as_ref().map(|o| o.comm.as_str()),
            )
    }

    pub fn matches(&self, ev: &Event) -> bool {
        let (conn, owner) = (ev.conn(), ev.owner());
        let conn_ok = match conn {
            Some(c) => self.matches_conn(c),
            None => self.ports.is_empty() && self.peers.is_empty() && self.family.is_none(),
        };
        conn_ok
            && self.matches_netns(ev.netns())
            && self.matches_owner(owner.map(|o| o.pid), owner.map(|o| o.comm.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_networks_and_hosts() {
        let n: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(!n.contains("::1".parse().unwrap()));
        let h: Cidr = "127.0.0.1".parse().unwrap();
        assert_eq!(h.to_string(), "127.0.0.1/32");
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        let odd: Cidr = "10.0.0.0/9".parse().unwrap();
        assert!(odd.contains("10.127.0.1".parse().unwrap()));
        assert!(!odd.contains("10.128.0.1".parse().unwrap()));
        let any: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(any.contains("8.8.8.8".parse().unwrap()));
        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().unwrap();
        assert_eq!(mapped.to_string(), "10.0.0.0/8");
        let all_v4: Cidr = "::ffff:0.0.0.0/96".parse().unwrap();
        assert_eq!(all_v4.to_string(), "0.0.0.0/0");
    }

    #[test]
    fn rejects_bad_cidrs_naming_the_value() {
        for (bad, needle) in [
            ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
            ("10.0.0.0/33", "0 to 32"),
            ("::/129", "0 to 128"),
            ("10.0.0.0/", "prefix length"),
            ("10.0.0.0/+8", "prefix length"),
            ("banana", "'banana' is not an IP"),
            ("", "is not an IP"),
            ("10.0.0.0/8/8", "prefix length"),
            // Named as typed, never as the IPv4 it stands for.
            (
                "::ffff:10.0.0.0/96",
                "'::ffff:10.0.0.0/96' has host bits set; did you mean ::ffff:0.0.0.0/96?",
            ),
            ("::ffff:10.0.0.1/104", "did you mean ::ffff:10.0.0.0/104?"),
        ] {
            let err = bad.parse::<Cidr>().unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn filter_combines_with_and_and_lists_with_or() {
        let conn = Conn {
            local: "127.0.0.1:40000".parse().unwrap(),
            remote: "10.0.0.2:6379".parse().unwrap(),
        };
        let mut f = Filter::default();
        assert!(f.matches_conn(&conn));
        f.ports = vec![80, 6379];
        assert!(f.matches_conn(&conn));
        f.peers = vec!["10.0.0.0/24".parse().unwrap()];
        assert!(f.matches_conn(&conn));
        f.family = Some(6);
        assert!(!f.matches_conn(&conn));
        f.family = Some(4);
        f.ports = vec![40000];
        assert!(f.matches_conn(&conn), "local port matches too");
        f.ports = vec![1];
        assert!(!f.matches_conn(&conn));

        let mut f = Filter {
            pids: vec![5],
            ..Filter::default()
        };
        assert!(f.matches_owner(Some(5), Some("x")));
        assert!(!f.matches_owner(None, None), "unknown owner is not pid 5");
        f.comms = vec!["curl".into()];
        assert!(!f.matches_owner(Some(5), Some("wget")));
    }

    #[test]
    fn netns_keeps_the_events_of_those_namespaces() {
        let enter = |netns| {
            Event::Enter(TwEnter {
                ts_ns: 0,
                timer: 1,
                conn: Conn {
                    local: "127.0.0.1:40000".parse().unwrap(),
                    remote: "127.0.0.1:80".parse().unwrap(),
                },
                netns,
                owner: None,
                role: crate::kernel::decode::Role::Connected,
                timeout_jiffies: 0,
                substate: crate::track::lifecycle::Substate::TimeWait,
                bound: false,
                seeded: false,
            })
        };
        let f = Filter {
            netns: vec![4026532281, 4026532290],
            ..Filter::default()
        };
        assert!(f.matches(&enter(4026532281)));
        assert!(f.matches(&enter(4026532290)));
        assert!(!f.matches(&enter(4026531840)));
        let Event::Enter(e) = enter(4026531840) else {
            unreachable!()
        };
        assert!(!f.matches_enter(&e));
        assert!(
            Filter::default().matches(&enter(0)),
            "no --netns: every namespace"
        );
    }
}
