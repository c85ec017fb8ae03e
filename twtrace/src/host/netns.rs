//! Network namespaces: which exist, what to call them, and reading inside each one.
//!
//! The kernel programs see the sockets of every namespace. What twtrace judges them by is per
//! namespace in the kernel: each has its own ephemeral ports, `tcp_tw_reuse`,
//! `tcp_max_tw_buckets`, TcpExt counters and sockstat, and a process reads those of its own
//! (`/proc/net`, `/proc/sys/net` and netlink sock_diag all answer for the reader's namespace).
//! So twtrace finds every namespace of the host and enters each one from a thread of its own
//! (`setns(2)` with `CLONE_NEWNET` changes only the calling thread), never from the threads that
//! serve or trace.
//!
//! A namespace is found through a process inside it (`/proc/PID/ns/net`) or a bind mount of it
//! (an nsfs mount such as `ip netns add`'s `/run/netns/NAME`); a namespace with neither no longer
//! exists (the kernel then kills its TIME_WAIT sockets). Its identity is the inode number of its
//! nsfs file: what `lsns -t net`, `readlink /proc/PID/ns/net` and `ip netns identify` show, and
//! what the kernel programs read from `sock->__sk_common.skc_net->ns.inum`. Inode numbers are
//! reused after a namespace is gone, so twtrace forgets one as soon as it is no longer found.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::{self, ErrorKind},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use super::cgroup;

/// A discovery is repeated at most this often (namespaces come and go with containers).
pub const REDISCOVER: Duration = Duration::from_secs(1);

/// One network namespace of the host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Netns {
    /// Inode number of its nsfs file.
    pub inode: u32,
    /// The best name known: `host` for the initial namespace, a name under /run/netns (or of
    /// another bind mount), `pod UID` or `container ID` from the cgroup of a process inside;
    /// None when there is none (shown as the inode number).
    pub name: Option<String>,
    /// The lowest pid of a process inside, when one can be seen.
    pub pid: Option<u32>,
    /// How to enter it: its bind mount, or `/proc/PID/ns/net`.
    pub path: PathBuf,
}

impl Netns {
    /// The name to show: the best name, else the inode number.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.inode.to_string())
    }
}

/// The inode of the nsfs file at `path` (it follows the `/proc/PID/ns/net` link).
pub fn inode_of(path: &Path) -> io::Result<u32> {
    Ok(fs::metadata(path)?.ino() as u32)
}

/// The namespace this process (its main thread) lives in.
pub fn own() -> Option<u32> {
    inode_of(Path::new("/proc/self/ns/net")).ok()
}

/// The initial namespace, the host's: that of kthreadd (pid 2, a kernel thread, which never
/// leaves it), or of pid 1 when pid 2 is not kthreadd (twtrace in a pid namespace of its own).
fn initial() -> Option<u32> {
    let is_kthreadd = fs::read_to_string("/proc/2/stat")
        .ok()
        .and_then(|s| {
            s.rsplit(')')
                .next()
                .map(|r| r.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let pid = if is_kthreadd { 2 } else { 1 };
    inode_of(Path::new(&format!("/proc/{pid}/ns/net"))).ok()
}

/// `net:[4026532281]` mounted at `/run/netns/web` (fields of /proc/self/mountinfo): the bind
/// mounts of network namespaces, with the name they are known by.
pub fn nsfs_mounts(mountinfo: &str) -> Vec<(u32, PathBuf)> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|&f| f == "-") else {
            continue;
        };
        if fields.get(dash + 1) != Some(&"nsfs") {
            continue;
        }
        let (Some(root), Some(point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let Some(inode) = root
            .strip_prefix("net:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        out.push((inode, PathBuf::from(unescape_mount_path(point))));
    }
    out
}

/// Mount points escape space, tab, newline and backslash as octal (`\040`).
fn unescape_mount_path(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The name a bind mount gives: `web` for `/run/netns/web` (ip netns), the path otherwise.
fn mount_name(path: &Path) -> String {
    let named = ["/run/netns", "/var/run/netns"]
        .iter()
        .any(|d| path.parent() == Some(Path::new(d)));
    match path.file_name() {
        Some(n) if named => n.to_string_lossy().into_owned(),
        _ => path.display().to_string(),
    }
}

/// Every network namespace that can be seen now, by inode: through the nsfs bind mounts and
/// the processes (`/proc/*/ns/net`; a process whose link cannot be read is skipped). Named after
/// `name_of`'s rules.
pub fn discover() -> BTreeMap<u32, Netns> {
    let mut found: BTreeMap<u32, Netns> = BTreeMap::new();
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for (inode, path) in nsfs_mounts(&mounts) {
        // The first mount of a namespace names it; /run/netns names win (listed by ip netns).
        let name = mount_name(&path);
        let entry = found.entry(inode).or_insert_with(|| Netns {
            inode,
            name: Some(name.clone()),
            pid: None,
            path: path.clone(),
        });
        if !name.starts_with('/') && entry.name.as_deref().is_some_and(|n| n.starts_with('/')) {
            entry.name = Some(name);
            entry.path = path;
        }
    }
    let mut pids: Vec<u32> = fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort_unstable();
    for pid in pids {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        // A process that exited, or one whose links this process may not read.
        let Ok(inode) = inode_of(&path) else { continue };
        let entry = found.entry(inode).or_insert_with(|| Netns {
            inode,
            name: None,
            pid: None,
            path: path.clone(),
        });
        if entry.pid.is_none() {
            entry.pid = Some(pid);
            if entry.name.is_none() {
                entry.name = workload_name(pid);
            }
        }
    }
    if let Some(host) = initial()
        && let Some(ns) = found.get_mut(&host)
    {
        ns.name = Some("host".into());
    }
    found
}

/// `pod UID` or `container ID` from the cgroup of a process, when it runs in one.
fn workload_name(pid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    // The unified hierarchy's line, `0::/path`.
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let w = cgroup::workload_of(path);
    match (w.pod_uid, w.container) {
        (Some(uid), _) => Some(format!("pod {uid}")),
        (None, Some(id)) => Some(format!("container {id}")),
        _ => None,
    }
}

/// The namespaces known, refreshed on demand at most once per `REDISCOVER`.
#[derive(Debug, Default)]
pub struct Registry {
    known: BTreeMap<u32, Netns>,
    discovered: Option<Instant>,
}

impl Registry {
    pub fn new() -> Self {
        let mut r = Self::default();
        r.refresh(true);
        r
    }

    /// Discovers again when `force` or when the last discovery is older than `REDISCOVER`;
    /// returns whether it did.
    pub fn refresh(&mut self, force: bool) -> bool {
        if !force && self.discovered.is_some_and(|t| t.elapsed() < REDISCOVER) {
            return false;
        }
        self.known = discover();
        self.discovered = Some(Instant::now());
        true
    }

    /// A namespace by inode, discovering again (rate-limited) when it is not known yet.
    pub fn get(&mut self, inode: u32) -> Option<&Netns> {
        if !self.known.contains_key(&inode) {
            self.refresh(false);
        }
        self.known.get(&inode)
    }

    /// The name to show for a namespace (its inode number when it has none or is unknown).
    pub fn label(&mut self, inode: u32) -> String {
        match self.get(inode) {
            Some(ns) => ns.label(),
            None => inode.to_string(),
        }
    }

    pub fn all(&self) -> impl Iterator<Item = &Netns> {
        self.known.values()
    }

    pub fn contains(&self, inode: u32) -> bool {
        self.known.contains_key(&inode)
    }

    /// Replaces what is known (a discovery made elsewhere: serve's collector).
    pub fn replace(&mut self, known: Vec<Netns>) {
        self.known = known.into_iter().map(|n| (n.inode, n)).collect();
        self.discovered = Some(Instant::now());
    }
}

/// `--netns`: an inode number, a name under /run/netns, or `pid:PID`. Errors name the value
/// and say what exists.
pub fn resolve(spec: &str) -> Result<u32, String> {
    let known = discover();
    resolve_in(spec, &known)
}

pub fn resolve_in(spec: &str, known: &BTreeMap<u32, Netns>) -> Result<u32, String> {
    if spec.is_empty() {
        return Err("a network namespace cannot be empty (an inode, a name or pid:PID)".into());
    }
    if let Some(pid) = spec.strip_prefix("pid:") {
        let pid: u32 = pid
            .parse()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("'{spec}' is not pid:PID with a process id"))?;
        return inode_of(Path::new(&format!("/proc/{pid}/ns/net")))
            .map_err(|e| format!("'{spec}': cannot read /proc/{pid}/ns/net ({e})"));
    }
    if let Ok(inode) = spec.parse::<u32>()
        && spec.bytes().all(|b| b.is_ascii_digit())
    {
        return if known.contains_key(&inode) {
            Ok(inode)
        } else {
            Err(format!(
                "'{spec}': no network namespace has this inode number now (`lsns -t net` lists them)"
            ))
        };
    }
    known
        .values()
        .find(|n| n.name.as_deref() == Some(spec))
        .map(|n| n.inode)
        .ok_or_else(|| {
            let names: Vec<&str> = known.values().filter_map(|n| n.name.as_deref()).collect();
            format!(
                "'{spec}' names no network namespace (known: {}; or give an inode number or pid:PID)",
                if names.is_empty() {
                    "none".to_owned()
                } else {
                    names.join(", ")
                }
            )
        })
}

/// Why a namespace could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unreadable {
    /// It no longer exists (its last process and mount went away while reading): not an
    /// error, its figures simply end.
    Gone,
    /// Entering it needs CAP_SYS_ADMIN (and CAP_SYS_PTRACE to open another user's
    /// /proc/PID/ns/net), which this process lacks.
    NoPrivilege,
    Other(String),
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Gone => f.write_str("it no longer exists"),
            Self::NoPrivilege => f.write_str(
                "entering another network namespace needs CAP_SYS_ADMIN (and CAP_SYS_PTRACE for another user's process)",
            ),
            Self::Other(e) => f.write_str(e),
        }
    }
}

fn classify(e: io::Error) -> Unreadable {
    match e.kind() {
        ErrorKind::NotFound => Unreadable::Gone,
        ErrorKind::PermissionDenied => Unreadable::NoPrivilege,
        _ if e.raw_os_error() == Some(libc::EPERM) => Unreadable::NoPrivilege,
        // ESRCH: the process of /proc/PID/ns/net exited; EINVAL: not a namespace any more.
        _ if matches!(e.raw_os_error(), Some(libc::ESRCH) | Some(libc::EINVAL)) => Unreadable::Gone,
        _ => Unreadable::Other(e.to_string()),
    }
}

fn enter(path: &Path) -> Result<(), Unreadable> {
    let file = fs::File::open(path).map_err(classify)?;
    // SAFETY: a valid descriptor of an nsfs file; CLONE_NEWNET checks that it is one.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(classify(io::Error::last_os_error()));
    }
    Ok(())
}

/// Runs `read` inside each namespace of `targets`, in order, from a thread of its own (which
/// ends with it, so no other thread ever changes namespace). The namespace the process lives in
/// is read without entering it. Results by inode.
pub fn in_each<T: Send>(
    targets: &[Netns],
    read: impl Fn(&Netns) -> T + Sync,
) -> HashMap<u32, Result<T, Unreadable>> {
    let own = own();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut out = HashMap::with_capacity(targets.len());
            let mut home = true;
            for ns in targets {
                let r = if Some(ns.inode) == own && home {
                    Ok(read(ns))
                } else {
                    home = false;
                    enter(&ns.path).and_then(|()| {
                        // Entered through a path whose namespace may have been replaced by a
                        // newer one with the same name: only the namespace asked for counts.
                        match inode_of(Path::new("/proc/thread-self/ns/net")) {
                            Ok(i) if i == ns.inode => Ok(read(ns)),
                            Ok(_) => Err(Unreadable::Gone),
                            Err(e) => Err(classify(e)),
                        }
                    })
                };
                out.insert(ns.inode, r);
            }
            out
        })
        .join()
        .unwrap_or_default()
    })
}

/// The directory of the calling thread's own network namespace's /proc files: `/proc/net` is
/// the main thread's, which a thread that entered another namespace must not read.
pub fn proc_net() -> &'static Path {
    Path::new("/proc/thread-self/net")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nsfs_mounts_are_read_from_mountinfo() {
        let text = "\
22 28 0:21 / /proc rw,nosuid - proc proc rw
615 612 0:4 net:[4026532281] /run/netns/web rw shared:290 - nsfs nsfs rw
616 612 0:4 net:[4026532300] /run/netns/a\\040b rw - nsfs nsfs rw
617 612 0:4 mnt:[4026532301] /run/mntns rw - nsfs nsfs rw
618 612 0:4 net:[4026532302] /var/run/docker/netns/1f2e rw - nsfs nsfs rw
";
        assert_eq!(
            nsfs_mounts(text),
            vec![
                (4026532281, PathBuf::from("/run/netns/web")),
                (4026532300, PathBuf::from("/run/netns/a b")),
                (4026532302, PathBuf::from("/var/run/docker/netns/1f2e")),
            ]
        );
        assert_eq!(mount_name(Path::new("/run/netns/web")), "web");
        assert_eq!(
            mount_name(Path::new("/var/run/docker/netns/1f2e")),
            "/var/run/docker/netns/1f2e"
        );
    }

    #[test]
    fn netns_specs_resolve_or_say_what_exists() {
        let ns = |inode, name: Option<&str>| Netns {
            inode,
            name: name.map(str::to_owned),
            pid: None,
            path: PathBuf::new(),
        };
        let known: BTreeMap<u32, Netns> = [
            (4026531840, ns(4026531840, Some("host"))),
            (4026532281, ns(4026532281, Some("web"))),
            (4026532290, ns(4026532290, None)),
        ]
        .into_iter()
        .collect();
        assert_eq!(resolve_in("web", &known), Ok(4026532281));
        assert_eq!(resolve_in("4026532290", &known), Ok(4026532290));
        let e = resolve_in("db", &known).unwrap_err();
        assert!(e.contains("'db'") && e.contains("host, web"), "{e}");
        let e = resolve_in("4026532999", &known).unwrap_err();
        assert!(e.contains("'4026532999'"), "{e}");
        assert!(resolve_in("pid:x", &known).unwrap_err().contains("'pid:x'"));
        assert!(resolve_in("", &known).is_err());
        let own = own().expect("this process's namespace");
        assert_eq!(
            resolve_in("pid:1", &known).is_ok(),
            inode_of(Path::new("/proc/1/ns/net")).is_ok()
        );
        assert_eq!(
            resolve_in(&format!("pid:{}", std::process::id()), &known),
            Ok(own)
        );
    }

    #[test]
    fn the_own_namespace_is_discovered_and_read_in_place() {
        let own = own().expect("this process's namespace");
        let known = discover();
        let me = known.get(&own).expect("found through /proc");
        assert!(me.pid.is_some());
        let read = in_each(std::slice::from_ref(me), |ns| ns.inode);
        assert_eq!(read.get(&own), Some(&Ok(own)));
    }
}
