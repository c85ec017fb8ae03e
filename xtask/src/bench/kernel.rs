//! What the kernel and /proc say: a process's CPU time, peak RSS and BPF program ids, the other
//! processes' CPU, IRQ-work interrupts, TIME_WAIT slab objects, TcpExt counters, and bpftool's
//! view of one program.

use std::{collections::BTreeSet, fs, process::Command, time::Duration};

use crate::setup;
use crate::{json::Json, procs::run_for};

/// utime + stime of a process in ms, and its state letter.
pub(super) fn proc_cpu(pid: u32, clk_tck: f64) -> Option<(f64, char)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some(((utime + stime) * 1000.0 / clk_tck, state))
}

/// VmHWM in kB (absent once the process has exited).
pub(super) fn proc_hwm_kb(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The BPF program ids a process holds (its fdinfo names them).
pub(super) fn proc_prog_ids(pid: u32) -> BTreeSet<u64> {
    let mut ids = BTreeSet::new();
    if let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in dir.flatten() {
            if let Ok(s) = fs::read_to_string(e.path()) {
                for l in s.lines() {
                    if let Some(v) = l.strip_prefix("prog_id:") {
                        if let Ok(id) = v.trim().parse() {
                            ids.insert(id);
                        }
                    }
                }
            }
        }
    }
    ids
}

/// CPU time (ms) used so far by every userspace process but these, children reaped by them
/// included (a process that lives and dies between two readings shows in its parent's
/// cutime). Kernel threads are left out: they do our load's softirq work too.
pub(super) fn others_cpu_ms(exclude: &[u32], clk_tck: f64) -> f64 {
    let mut ticks = 0.0;
    let Ok(dir) = fs::read_dir("/proc") else {
        return 0.0;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if exclude.contains(&pid) || pid == 2 {
            continue;
        }
        let Ok(st) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = st.rfind(')') else { continue };
        let f: Vec<&str> = st[close + 1..].split_whitespace().collect();
        // Fields after the name: state ppid ... utime(11) stime(12) cutime(13) cstime(14).
        if f.get(1) == Some(&"2") {
            continue;
        }
        for i in 11..=14 {
            ticks += f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        }
    }
    ticks * 1000.0 / clk_tck
}

/// The host's busy CPU time so far, all CPUs, in ms, from the `cpu` line of /proc/stat: user,
/// nice, system, irq and softirq (guest time is inside user). Idle, iowait and steal (time the
/// hypervisor gave another guest) are left out.
pub(super) fn host_busy_ms(clk_tck: f64) -> Option<f64> {
    busy_ticks(&fs::read_to_string("/proc/stat").ok()?).map(|t| t * 1000.0 / clk_tck)
}

fn busy_ticks(stat: &str) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map_while(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    Some(
        [0, 1, 2, 5, 6]
            .iter()
            .map(|&i| f.get(i).copied().unwrap_or(0.0))
            .sum(),
    )
}

/// The children of a process (every thread's), e.g. serve's collector process.
pub(super) fn proc_children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in dir.flatten() {
            if let Ok(s) = fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// IRQ-work interrupts (the wake-ups BPF programs ask for), all CPUs.
pub(super) fn irq_work() -> u64 {
    let s = fs::read_to_string("/proc/interrupts").unwrap_or_default();
    s.lines()
        .find(|l| l.trim_start().starts_with("IWI:"))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|w| w.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
}

/// Timewait sockets allocated on the whole host (slab objects in use).
pub(super) fn tw_slab_objects() -> u64 {
    let s = fs::read_to_string("/proc/slabinfo").unwrap_or_default();
    s.lines()
        .filter(|l| l.starts_with("tw_sock_TCP ") || l.starts_with("tw_sock_TCPv6 "))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

pub(super) fn parse_netstat(text: &str, prefix: &str) -> Vec<(String, u64)> {
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
    let mut out = Vec::new();
    for pair in lines.chunks(2) {
        if let [names, values] = pair {
            for (k, v) in names
                .split_whitespace()
                .zip(values.split_whitespace())
                .skip(1)
            {
                if let Ok(v) = v.parse() {
                    out.push((k.to_owned(), v));
                }
            }
        }
    }
    out
}

pub(super) fn counter(c: &[(String, u64)], name: &str) -> u64 {
    c.iter().find(|(k, _)| k == name).map_or(0, |(_, v)| *v)
}

pub(super) fn bpftool_prog(id: u64) -> Option<Json> {
    let out = run_for(
        Command::new(setup::which("bpftool")?).args(["prog", "show", "id", &id.to_string(), "-j"]),
        Duration::from_secs(10),
    )
    .ok()?;
    Json::parse(out.trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_leaves_out_idle_iowait_and_steal() {
        let stat = "cpu  100 5 50 1000 7 3 2 40 9 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n";
        assert_eq!(busy_ticks(stat), Some(160.0));
        assert_eq!(busy_ticks("intr 1 2\n"), None);
    }

    #[test]
    fn netstat_pairs() {
        let t = "TcpExt: SyncookiesSent TW TWKilled\nTcpExt: 0 81361 2\nIpExt: A\nIpExt: 1\n";
        let c = parse_netstat(t, "TcpExt:");
        assert_eq!(counter(&c, "TW"), 81361);
        assert_eq!(counter(&c, "TWKilled"), 2);
        assert_eq!(counter(&c, "A"), 0);
    }
}
