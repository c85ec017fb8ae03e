//! Set-up that must be undone: kernel.bpf_stats_enabled (restored when dropped, and by a guard
//! process after a Ctrl-C) and the runs' network namespaces (deleted when dropped).

use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use super::{kernel::parse_netstat, MAX_TW};
use crate::procs::{ip, run_for, wait_for};

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// Restores kernel.bpf_stats_enabled (switched on for the cost runs only, see `set_bpf_stats`)
/// to its previous value when dropped (normal end, error, panic). A Ctrl-C kills xtask before any destructor runs: for that, a
/// guard process (its own process group, SIGINT ignored) waits for xtask to disappear and then
/// restores the value, deletes this run's namespaces and stops the tracer of the moment.
pub(super) struct Restore {
    prev: String,
    flag: PathBuf,
    guard: Option<Child>,
}

impl Restore {
    pub(super) fn new(state_dir: &Path) -> Result<Self, String> {
        let prev = fs::read_to_string(BPF_STATS)
            .map_err(|e| format!("cannot read {BPF_STATS}: {e}"))?
            .trim()
            .to_owned();
        let pid = std::process::id();
        let flag = state_dir.join("running");
        fs::write(&flag, "").map_err(|e| format!("cannot write {}: {e}", flag.display()))?;
        let pids = state_dir.join("pids");
        let _ = fs::write(&pids, "");
        let script = format!(
            "trap '' INT TERM HUP
while kill -0 {pid} 2>/dev/null && [ -e '{flag}' ]; do sleep 0.5; done
[ -e '{flag}' ] || exit 0
echo {prev} > {BPF_STATS}
for p in $(cat '{pids}' 2>/dev/null); do kill -INT $p 2>/dev/null; done
sleep 2
for p in $(cat '{pids}' 2>/dev/null); do kill -KILL $p 2>/dev/null; done
for ns in $({ip} netns list 2>/dev/null | cut -d' ' -f1); do
  case $ns in twt-bench-{pid}-*) {ip} netns del $ns ;; esac
done
rm -rf '{dir}'
echo 'xtask bench: interrupted: restored kernel.bpf_stats_enabled={prev}, removed its namespaces' >&2
",
            flag = flag.display(),
            pids = pids.display(),
            ip = ip().display(),
            dir = state_dir.display(),
        );
        let guard = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .ok();
        if guard.is_none() {
            eprintln!("xtask bench: no guard process: a Ctrl-C would leave bpf stats enabled");
        }
        // The throughput runs are measured without it: it adds two clock reads to every run of
        // every BPF program, which is the instrument's cost, not the tracer's.
        set_bpf_stats(false)?;
        Ok(Self { prev, flag, guard })
    }
}

pub(super) fn set_bpf_stats(on: bool) -> Result<(), String> {
    fs::write(BPF_STATS, if on { "1" } else { "0" })
        .map_err(|e| format!("cannot set kernel.bpf_stats_enabled: {e}"))
}

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS, &self.prev) {
            eprintln!(
                "xtask bench: cannot restore kernel.bpf_stats_enabled={}: {e}",
                self.prev
            );
        }
        let _ = fs::remove_file(&self.flag);
        if let Some(mut g) = self.guard.take() {
            // It sees the flag gone within half a second and exits without touching anything.
            if wait_for(&mut g, Duration::from_secs(3), || {}).is_none() {
                eprintln!("xtask bench: the guard process did not exit: killed");
            }
        }
    }
}

/// A fresh network namespace, deleted when dropped.
pub(super) struct Netns {
    pub(super) name: String,
}

impl Netns {
    pub(super) fn new(name: String) -> Result<Self, String> {
        let t = Duration::from_secs(10);
        run_for(Command::new(ip()).args(["netns", "add", &name]), t)?;
        let ns = Netns { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        ns.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.tcp_max_tw_buckets={MAX_TW}"),
        ])?;
        Ok(ns)
    }

    fn exec(&self, args: &[&str]) -> Result<String, String> {
        run_for(
            Command::new(ip())
                .args(["netns", "exec", &self.name])
                .args(args),
            Duration::from_secs(10),
        )
    }

    pub(super) fn tcpext(&self) -> Vec<(String, u64)> {
        self.exec(&["cat", "/proc/net/netstat"])
            .map(|t| parse_netstat(&t, "TcpExt:"))
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_for(
            Command::new(ip()).args(["netns", "del", &self.name]),
            Duration::from_secs(20),
        ) {
            eprintln!("xtask bench: {e}");
        }
    }
}
