//! The host's per-namespace facts, gathered on request: which network namespaces exist and
//! what they are called, the kernel's own figures in each, and who holds CLOSE_WAIT sockets.
//!
//! Gathering them needs privileges the views should not keep: entering another namespace needs
//! CAP_SYS_ADMIN, reading another user's /proc/PID/fd and /proc/PID/ns/net needs
//! CAP_SYS_PTRACE, and traversing them CAP_DAC_READ_SEARCH. Every view but `serve` runs as
//! root and gathers in its own process ([`Collector::handle`]). `serve` answers HTTP requests
//! and must not hold those capabilities, so it starts a *collector process* before it drops
//! privileges: the same binary, under the name `twtrace-collector`, which keeps exactly those
//! three capabilities and nothing else, takes no input but these requests on a pipe, and
//! answers each with one JSON line ([`child_main`], [`Client`]). It also relays the kernel
//! programs' counters (lost events among them), which serve cannot read itself after its drop on
//! kernels before 5.19 (`Probes::try_counters`): serve hands it a descriptor of their map, and
//! CAP_SYS_ADMIN lets it read one.

use std::{
    collections::{BTreeMap, HashMap},
    io::{self, BufRead, Write},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuArray};
use serde::{Deserialize, Serialize};

use crate::kernel::{
    decode::Conn,
    probes::{self, KernelCounters},
};

use super::{
    clock,
    close_wait::{self, CloseWait},
    figures::{self, Ledger, NsFigures},
    netns::{self, Netns, Registry, Unreadable},
    sockdiag,
};

/// The program name the collector runs under (`ps` shows it; `main` dispatches on it).
pub const COLLECTOR_NAME: &str = "twtrace-collector";

/// What to gather.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Namespaces whose kernel figures are wanted (None: every namespace).
    pub figures: Option<Vec<u32>>,
    /// CLOSE_WAIT holders in these namespaces (None: not now; an empty list: every namespace).
    pub close_wait: Option<Vec<u32>>,
    /// Timewait sockets to look up by 4-tuple (`Session::lookups`).
    #[serde(default)]
    pub lookups: Vec<Lookup>,
}

/// A socket to look up in its namespace; the timer names it for the asker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lookup {
    pub netns: u32,
    pub timer: u64,
    pub conn: Conn,
}

/// A looked-up socket the kernel has: its state (a timewait socket's substate) and the ms its
/// timer has left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Looked {
    pub lookup: Lookup,
    pub state: u8,
    pub expires_ms: u32,
    /// When it was looked up (CLOCK_MONOTONIC, ns): `expires_ms` counts from then, not from
    /// when the reply is read.
    #[serde(default)]
    pub at_ns: u64,
}

/// A namespace that could not be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denied {
    pub netns: u32,
    /// The missing privilege (true), or another reason (`why`).
    pub no_privilege: bool,
    pub why: String,
}

/// What was gathered.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// Every namespace that exists now.
    pub namespaces: Vec<Netns>,
    pub figures: Vec<(u32, NsFigures)>,
    /// CLOSE_WAIT per holder, largest first (None when not asked).
    pub close_wait: Option<Vec<CloseWait>>,
    /// Seconds the CLOSE_WAIT scan took (the kernel walks its whole connection table once per
    /// namespace).
    pub scan_seconds: f64,
    /// Namespaces that could not be read now, and why.
    pub denied: Vec<Denied>,
    /// The kernel programs' counters (serve's collector, when handed their map and able to
    /// read it).
    #[serde(default)]
    pub counters: Option<KernelCounters>,
    /// The looked-up sockets that exist (a socket gone meanwhile is left out).
    #[serde(default)]
    pub looked: Vec<Looked>,
}

fn denied(netns: u32, e: &Unreadable) -> Denied {
    Denied {
        netns,
        no_privilege: *e == Unreadable::NoPrivilege,
        why: e.to_string(),
    }
}

/// Gathers, in whichever process holds the privileges.
#[derive(Debug, Default)]
pub struct Collector {
    registry: Registry,
}

impl Collector {
    pub fn new() -> Self {
        Self {
            registry: Registry::new(),
        }
    }

    pub fn handle(&mut self, req: &Request) -> Reply {
        self.registry.refresh(false);
        let pick = |which: &Option<Vec<u32>>, all_when_empty: bool| -> Vec<Netns> {
            self.registry
                .all()
                .filter(|n| match which {
                    None => true,
                    Some(list) => (all_when_empty && list.is_empty()) || list.contains(&n.inode),
                })
                .cloned()
                .collect()
        };
        let mut reply = Reply {
            namespaces: self.registry.all().cloned().collect(),
            ..Reply::default()
        };
        let targets = pick(&req.figures, false);
        let mut read = netns::in_each(&targets, |_| figures::read_here());
        let mut inodes: Vec<u32> = read.keys().copied().collect();
        inodes.sort_unstable();
        for inode in inodes {
            match read.remove(&inode) {
                Some(Ok(f)) => reply.figures.push((inode, f)),
                Some(Err(Unreadable::Gone)) | None => {}
                Some(Err(e)) => reply.denied.push(denied(inode, &e)),
            }
        }
        if !req.lookups.is_empty() {
            let targets: Vec<Netns> = self
                .registry
                .all()
                .filter(|n| req.lookups.iter().any(|l| l.netns == n.inode))
                .cloned()
                .collect();
            let found = netns::in_each(&targets, |ns| {
                let mine: Vec<Lookup> = req
                    .lookups
                    .iter()
                    .filter(|l| l.netns == ns.inode)
                    .copied()
                    .collect();
                let conns: Vec<Conn> = mine.iter().map(|l| l.conn).collect();
                let at_ns = clock::monotonic_ns();
                sockdiag::lookup(&conns).map(|socks| {
                    mine.into_iter()
                        .zip(socks)
                        .filter_map(|(lookup, s)| {
                            s.map(|s| Looked {
                                lookup,
                                state: s.state,
                                expires_ms: s.expires_ms,
                                at_ns,
                            })
                        })
                        .collect::<Vec<_>>()
                })
            });
            // A namespace that cannot be read now is looked up again at the next check. A
            // socket bound to a device (SO_BINDTODEVICE, a VRF) is not found: the lookup names
            // no interface.
            reply
                .looked
                .extend(found.into_values().flatten().flatten().flatten());
        }
        if req.close_wait.is_some() {
            let targets = pick(&req.close_wait, true);
            let started = Instant::now();
            let (cw, unreadable) = close_wait::by_process(&targets);
            reply.scan_seconds = started.elapsed().as_secs_f64();
            reply.close_wait = Some(cw);
            for (inode, e) in unreadable {
                if !reply.denied.iter().any(|d| d.netns == inode) {
                    reply.denied.push(denied(inode, &e));
                }
            }
        }
        reply
    }
}

/// What the views know of the host, kept from the replies.
#[derive(Debug, Default)]
pub struct Host {
    pub namespaces: BTreeMap<u32, Netns>,
    pub ledger: Ledger,
    /// The last CLOSE_WAIT scan.
    pub close_wait: Vec<CloseWait>,
    pub scan_seconds: f64,
    /// Namespaces that could not be read at the last request.
    pub denied: Vec<Denied>,
    /// Whether the missing privilege was said already (it is said once).
    told: bool,
    /// Namespaces seen in the trace but not found by discovery, since when.
    absent_since: HashMap<u32, Instant>,
}

/// A namespace seen in the trace must be missing from discovery this long before it is taken
/// as gone: a namespace made just after a discovery is found by the next one (at most
/// `netns::REDISCOVER` later).
pub const GONE_AFTER: Duration = Duration::from_secs(2);

impl Host {
    /// Of the namespaces seen in the trace (with the TIME_WAIT sockets twtrace counts there),
    /// those that no longer exist: missing from every discovery, and with no TIME_WAIT left,
    /// for `GONE_AFTER`. The kernel kills a namespace's timewait sockets when it dismantles
    /// it, so a namespace that still has some is alive though unseen (its processes are
    /// another user's and this process may not read their /proc/PID/ns/net): it is kept. A
    /// namespace can live and die between two discoveries (a CI job's, a pod's that failed at
    /// once): this is how those are let go too.
    pub fn gone(&mut self, seen: impl Iterator<Item = (u32, u64)>) -> Vec<u32> {
        let now = Instant::now();
        let mut gone = Vec::new();
        let mut still = HashMap::new();
        for (netns, time_wait) in seen {
            if netns == 0 || time_wait > 0 || self.namespaces.contains_key(&netns) {
                continue;
            }
            let since = *self.absent_since.get(&netns).unwrap_or(&now);
            if now.duration_since(since) >= GONE_AFTER {
                gone.push(netns);
            } else {
                still.insert(netns, since);
            }
        }
        self.absent_since = still;
        gone
    }

    /// Takes in a reply; returns the namespaces that existed before and are gone now.
    pub fn apply(&mut self, reply: Reply) -> Vec<u32> {
        let now: BTreeMap<u32, Netns> =
            reply.namespaces.into_iter().map(|n| (n.inode, n)).collect();
        let gone: Vec<u32> = self
            .namespaces
            .keys()
            .filter(|i| !now.contains_key(i))
            .copied()
            .collect();
        for &inode in &gone {
            self.ledger.forget(inode);
        }
        self.namespaces = now;
        for (inode, f) in reply.figures {
            self.ledger.record(inode, f);
        }
        if let Some(cw) = reply.close_wait {
            self.close_wait = cw;
            self.scan_seconds = reply.scan_seconds;
        }
        self.denied = reply.denied;
        gone
    }

    /// How many namespaces twtrace cannot read: those it found but may not enter (no
    /// CAP_SYS_ADMIN), and those the trace shows alive (TIME_WAIT counted there; the kernel
    /// kills a dismantled namespace's timewait sockets) that discovery cannot find, because the
    /// processes inside are another user's and their /proc/PID/ns/net is not readable (no
    /// CAP_SYS_PTRACE, or a security module's ptrace rule). `seen`: (namespace, TIME_WAIT
    /// counted there), as the aggregate keeps them.
    pub fn unreadable(&self, seen: impl Iterator<Item = (u32, u64)>) -> usize {
        let denied = self.denied.iter().filter(|d| d.no_privilege).count();
        let hidden = seen
            .filter(|&(netns, tw)| {
                netns != 0
                    && tw > 0
                    && !self.namespaces.contains_key(&netns)
                    && !self.denied.iter().any(|d| d.netns == netns)
            })
            .count();
        denied + hidden
    }

    /// The name to show for a namespace.
    pub fn label(&self, inode: u32) -> String {
        self.namespaces
            .get(&inode)
            .map_or_else(|| inode.to_string(), Netns::label)
    }

    /// One line saying what cannot be seen and why, the first time something cannot.
    pub fn tell_once(&mut self) -> Option<String> {
        if self.told {
            return None;
        }
        let no_privilege = self.denied.iter().filter(|d| d.no_privilege).count();
        if no_privilege == 0 {
            return None;
        }
        self.told = true;
        Some(format!(
            "cannot read {no_privilege} of {} network namespaces: {}; their kernel figures, \
             existing TIME_WAIT and CLOSE_WAIT are not shown (counted as unreadable)",
            self.namespaces.len(),
            Unreadable::NoPrivilege
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// serve's collector process

/// Capabilities the collector keeps (`capability.h` numbers): CAP_DAC_READ_SEARCH (2) to
/// traverse other users' /proc/PID/fd, CAP_SYS_PTRACE (19) to read their fd links and
/// /proc/PID/ns/net, CAP_SYS_ADMIN (21) for setns(2) into each network namespace.
pub const COLLECTOR_CAPS: [u32; 3] = [2, 19, 21];

/// Keeps only `COLLECTOR_CAPS` (those of them it has: one that is missing shows later as
/// namespaces it cannot read, said once): the permitted and effective sets hold at most them,
/// inheritable and ambient nothing, and no_new_privs keeps it so. The bounding set is emptied of
/// everything else only where CAP_SETPCAP allows it (plain root, not a container).
fn keep_only_collector_caps() -> io::Result<()> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let permitted = status
        .lines()
        .find_map(|l| l.strip_prefix("CapPrm:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let mask: u64 = COLLECTOR_CAPS.iter().map(|&c| 1u64 << c).sum::<u64>() & permitted;
    for cap in 0..64u32 {
        if mask & (1 << cap) == 0 {
            // SAFETY: plain prctl; an unknown capability number is refused harmlessly.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let low = mask as u32;
    let high = (mask >> 32) as u32;
    let data = [
        Data {
            effective: low,
            permitted: low,
            inheritable: 0,
        },
        Data {
            effective: high,
            permitted: high,
            inheritable: 0,
        },
    ];
    // SAFETY: capset(2) with a version-3 header and two data words, as the ABI requires.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain prctl calls.
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        // Ends with serve even if serve is killed and cannot close the pipe first.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
    }
    Ok(())
}

/// The collector process: one request per line on stdin, one reply per line on stdout, until
/// stdin closes (serve ended).
pub fn child_main() -> std::process::ExitCode {
    if let Err(e) = keep_only_collector_caps() {
        eprintln!("twtrace-collector: cannot set its capabilities: {e}");
        return std::process::ExitCode::from(1);
    }
    let counters = relayed_counters_map();
    let mut collector = Collector::new();
    let stdin = io::stdin().lock();
    let mut stdout = io::stdout().lock();
    for line in stdin.lines() {
        let Ok(line) = line else { break };
        let mut reply = match serde_json::from_str::<Request>(&line) {
            Ok(req) => collector.handle(&req),
            // Only serve writes here; anything else is answered with nothing gathered.
            Err(_) => Reply::default(),
        };
        reply.counters = counters
            .as_ref()
            .and_then(|a| probes::read_counters(a).ok());
        if serde_json::to_writer(&mut stdout, &reply).is_err()
            || stdout.write_all(b"\n").is_err()
            || stdout.flush().is_err()
        {
            break;
        }
    }
    std::process::ExitCode::SUCCESS
}

/// The environment variable naming the descriptor of the counters' map that serve leaves open
/// for its collector.
const COUNTERS_FD_ENV: &str = "TWTRACE_COLLECTOR_COUNTERS_FD";

/// The counters' map serve handed over, if any (anything else under that number is refused:
/// aya asks the kernel what the descriptor is).
fn relayed_counters_map() -> Option<PerCpuArray<MapData, u64>> {
    let fd: RawFd = std::env::var(COUNTERS_FD_ENV).ok()?.parse().ok()?;
    // SAFETY: serve left this descriptor open for this process alone and closed its own copy;
    // nothing else here uses that number.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let data = MapData::from_fd(fd).ok()?;
    PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).ok()
}

/// serve's side of the pipe.
pub struct Client {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
    line: String,
}

impl Client {
    /// Starts the collector (while this process still holds the privileges it inherits), handing
    /// it a descriptor of the programs' counters map to read when given one.
    pub fn spawn(counters: Option<BorrowedFd<'_>>) -> io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg0(COLLECTOR_NAME)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        // A copy without close-on-exec, so that the collector inherits it; ours is closed once
        // it has started.
        let inherited = match counters {
            // SAFETY: fcntl(F_DUPFD) on a descriptor we hold; the copy is owned below.
            Some(fd) => match unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 3) } {
                -1 => None,
                // SAFETY: a new descriptor that nothing else owns.
                n => Some(unsafe { OwnedFd::from_raw_fd(n) }),
            },
            None => None,
        };
        if let Some(fd) = &inherited {
            cmd.env(COUNTERS_FD_ENV, fd.as_raw_fd().to_string());
        }
        let mut child = cmd.spawn()?;
        drop(inherited);
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| io::Error::other("no stdin"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        Ok(Self {
            child,
            stdin,
            stdout: tokio::io::BufReader::new(stdout),
            line: String::new(),
        })
    }

    /// One request and its reply.
    pub async fn ask(&mut self, req: &Request) -> io::Result<Reply> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let mut text = serde_json::to_string(req).map_err(io::Error::other)?;
        text.push('\n');
        self.stdin.write_all(text.as_bytes()).await?;
        self.stdin.flush().await?;
        self.line.clear();
        if self.stdout.read_line(&mut self.line).await? == 0 {
            let status = self.child.try_wait().ok().flatten();
            return Err(io::Error::other(format!(
                "the collector process ended ({})",
                status.map_or("still running".into(), |s| s.to_string())
            )));
        }
        serde_json::from_str(&self.line).map_err(io::Error::other)
    }
}

/// Gathers in this process and keeps the result: what every view but serve does.
pub fn gather(collector: &mut Collector, host: &mut Host, req: &Request) -> Vec<u32> {
    host.apply(collector.handle(req))
}

/// The namespaces of a run: those the filter names (`--netns`), or all of `seen`.
pub fn in_play(seen: impl Iterator<Item = u32>, filter: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = if filter.is_empty() {
        seen.collect()
    } else {
        filter.to_vec()
    };
    v.sort_unstable();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(inode: u32) -> Netns {
        Netns {
            inode,
            name: None,
            pid: None,
            path: std::path::PathBuf::new(),
        }
    }

    /// A namespace missing from discovery is gone only after `GONE_AFTER` of being missed, and
    /// one found again is not.
    #[test]
    fn namespaces_are_gone_once_missed_long_enough() {
        let mut host = Host::default();
        host.apply(Reply {
            namespaces: vec![ns(1), ns(2)],
            ..Reply::default()
        });
        let seen = |list: &[u32]| list.iter().map(|&n| (n, 0)).collect::<Vec<_>>().into_iter();
        assert_eq!(host.gone(seen(&[1, 2, 3])), Vec::<u32>::new());
        // 3 was missed just now; make it missed long ago.
        let long_ago = Instant::now() - GONE_AFTER;
        host.absent_since.insert(3, long_ago);
        host.absent_since.insert(4, long_ago);
        host.apply(Reply {
            namespaces: vec![ns(1), ns(4)],
            ..Reply::default()
        });
        assert_eq!(
            host.gone(seen(&[1, 3, 4, 2])),
            vec![3],
            "4 is back, 2 just left"
        );
        assert!(host.absent_since.contains_key(&2));
        assert!(!host.absent_since.contains_key(&4));
        // Unseen but with TIME_WAIT alive: not gone (its processes are out of sight).
        host.absent_since.insert(5, long_ago);
        assert_eq!(host.gone([(5, 3)].into_iter()), Vec::<u32>::new());
    }

    #[test]
    fn namespaces_alive_in_the_trace_but_not_found_count_as_unreadable() {
        let mut host = Host::default();
        host.apply(Reply {
            namespaces: vec![ns(1), ns(2)],
            denied: vec![Denied {
                netns: 2,
                no_privilege: true,
                why: String::new(),
            }],
            ..Reply::default()
        });
        // 1 is read; 2 found but not enterable; 3 holds TIME_WAIT yet was not found; 4 has
        // none left (it may be gone); 0 is unknown.
        let seen = [(1, 5), (2, 1), (3, 7), (4, 0), (0, 2)];
        assert_eq!(host.unreadable(seen.into_iter()), 2);
    }

    #[test]
    fn the_missing_privilege_is_told_once() {
        let mut host = Host::default();
        host.apply(Reply {
            namespaces: vec![ns(1), ns(2), ns(3)],
            denied: vec![Denied {
                netns: 2,
                no_privilege: true,
                why: Unreadable::NoPrivilege.to_string(),
            }],
            ..Reply::default()
        });
        let line = host.tell_once().expect("said");
        assert!(
            line.starts_with("cannot read 1 of 3 network namespaces"),
            "{line}"
        );
        assert!(line.contains("CAP_SYS_ADMIN"), "{line}");
        assert_eq!(host.tell_once(), None);
    }
}
