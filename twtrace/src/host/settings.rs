//! The sysctls that decide how much TIME_WAIT a network namespace can hold and how it is
//! reused (/proc/sys/net/ipv4), which `doctor` reasons on.

use std::fs;

/// Sysctls that decide how much TIME_WAIT a host can hold and how it is reused.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// net.ipv4.tcp_tw_reuse: 0 off, 1 on, 2 loopback only (the default).
    pub tw_reuse: Option<u32>,
    pub max_tw_buckets: Option<u64>,
    /// net.ipv4.ip_local_port_range.
    pub port_range: Option<(u16, u16)>,
    /// net.ipv4.ip_local_reserved_ports, as ranges.
    pub reserved_ports: Vec<(u16, u16)>,
    pub fin_timeout: Option<u32>,
    pub timestamps: Option<u32>,
    /// Present only on kernels before 4.12 (the setting was removed).
    pub tw_recycle: Option<u32>,
    /// net.ipv4.tcp_tw_reuse_delay (ms): how old a TIME_WAIT must be before connect() may
    /// reuse it. Only on kernels that have the setting (6.13+); older ones use one second.
    pub tw_reuse_delay_ms: Option<u32>,
}

impl Settings {
    /// Ports `connect()` can pick from: the range minus the reserved ports inside it.
    pub fn ephemeral_ports(&self) -> Option<u32> {
        let (lo, hi) = self.port_range?;
        if hi < lo {
            return Some(0);
        }
        let reserved: u32 = merge_ranges(&self.reserved_ports)
            .iter()
            .map(|&(a, b)| {
                let (a, b) = (a.max(lo), b.min(hi));
                if a <= b { (b - a) as u32 + 1 } else { 0 }
            })
            .sum();
        Some((hi - lo) as u32 + 1 - reserved)
    }
}

fn merge_ranges(ranges: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut v: Vec<(u16, u16)> = ranges.iter().copied().filter(|(a, b)| a <= b).collect();
    v.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

pub fn parse_port_range(s: &str) -> Option<(u16, u16)> {
    let mut it = s.split_whitespace();
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

/// `1000-1010,2000` -> [(1000, 1010), (2000, 2000)].
pub fn parse_reserved(s: &str) -> Vec<(u16, u16)> {
    s.trim()
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| match p.split_once('-') {
            Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
            None => {
                let v = p.trim().parse().ok()?;
                Some((v, v))
            }
        })
        .collect()
}

fn sysctl(name: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/sys/{}", name.replace('.', "/")))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// The settings of the calling thread's network namespace (/proc/sys/net answers for the
/// reader's namespace).
pub fn settings() -> Settings {
    let num = |n: &str| sysctl(n).and_then(|v| v.parse().ok());
    Settings {
        tw_reuse: num("net.ipv4.tcp_tw_reuse"),
        max_tw_buckets: sysctl("net.ipv4.tcp_max_tw_buckets").and_then(|v| v.parse().ok()),
        port_range: sysctl("net.ipv4.ip_local_port_range").and_then(|v| parse_port_range(&v)),
        reserved_ports: sysctl("net.ipv4.ip_local_reserved_ports")
            .map(|v| parse_reserved(&v))
            .unwrap_or_default(),
        fin_timeout: num("net.ipv4.tcp_fin_timeout"),
        timestamps: num("net.ipv4.tcp_timestamps"),
        tw_recycle: num("net.ipv4.tcp_tw_recycle"),
        tw_reuse_delay_ms: num("net.ipv4.tcp_tw_reuse_delay"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_ports_minus_reserved() {
        let mut s = Settings {
            port_range: parse_port_range("32768\t60999"),
            ..Settings::default()
        };
        assert_eq!(s.ephemeral_ports(), Some(28232));
        s.reserved_ports = parse_reserved("32768-32777,40000,1000-2000,32770-32780\n");
        // 32768..=32780 (13) and 40000 (1) inside the range.
        assert_eq!(s.ephemeral_ports(), Some(28232 - 14));
        assert_eq!(parse_reserved(""), vec![]);
        assert_eq!(Settings::default().ephemeral_ports(), None);
    }
}
