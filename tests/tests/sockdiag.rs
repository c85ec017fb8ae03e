//! `twtrace::host::sockdiag` against the running kernel: real sockets in a network namespace of the
//! test's own, with `ss` (iproute2's own sock_diag reader) and the churn tool's pids as the
//! judges.

use std::{
    collections::{BTreeSet, HashSet},
    fs::File,
    io,
    os::fd::AsRawFd,
    thread,
    time::{Duration, Instant},
};

use twtrace::host::sockdiag::{self, DiagSocket};
use twtrace_tests::*;

/// These tests create network namespaces; unlike the `watch` tests they need no twtrace binary.
fn require_root_user() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the sock_diag tests create network namespaces: run them as root"
    );
}

/// Runs `f` in `ns`'s network namespace. A socket belongs to the namespace of the thread that
/// creates it, and setns(CLONE_NEWNET) changes only the calling thread's: the work happens on
/// a thread of its own, which ends with it, so no other thread of the test moves.
fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{}", ns.name);
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: a valid namespace fd; CLONE_NEWNET only affects this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn dump_in(ns: &Netns, states: &'static [u8]) -> Vec<DiagSocket> {
    in_netns(ns, move || sockdiag::dump(states)).expect("sock_diag dump")
}

/// The 4-tuples as `ss` prints them (after the harness turns v4-mapped into IPv4).
fn tuples(socks: &[DiagSocket]) -> BTreeSet<(String, String)> {
    socks
        .iter()
        .map(|s| (s.conn.local.to_string(), s.conn.remote.to_string()))
        .collect()
}

/// The dump and `ss` agree, and nothing is listed twice.
fn assert_same_as_ss(ns: &Netns, port: u16, n: usize) -> Vec<DiagSocket> {
    let ss_before = ns.ss_time_wait_settled(port, n);
    assert_eq!(
        ss_before.len(),
        n,
        "ss time-wait on port {port}: {ss_before:?}"
    );
    let ours = dump_in(ns, &[6]);
    let ss_after = ns.ss_time_wait(port);
    assert_eq!(
        ss_before, ss_after,
        "the TIME_WAIT set changed while it was read"
    );
    let ss: BTreeSet<(String, String)> = ss_after.into_iter().collect();
    assert_eq!(ss.len(), n, "ss listed a tuple twice");
    // A fresh namespace holds only this test's sockets: the whole dump must match.
    assert_eq!(ours.len(), n, "dump: {ours:#?}");
    assert_eq!(tuples(&ours), ss);
    for s in &ours {
        assert_eq!(s.state, 6, "{s:?}");
        assert!(
            (50_000..=60_000).contains(&s.expires_ms),
            "a fresh TIME_WAIT has 60 s minus the test's few seconds left: {s:?}"
        );
        // A timewait socket is no file: inet_twsk_diag_fill reports inode 0 and uid 0.
        assert_eq!(s.inode, 0, "{s:?}");
    }
    ours
}

/// N client-closes-first connections: sock_diag lists exactly the client's N TIME_WAIT
/// sockets, the same 4-tuples as `ss`, each with under 60 s left.
#[test]
fn time_wait_dump_matches_ss() {
    require_root_user();
    const N: usize = 11;
    let ns = Netns::new("sd-tw");
    let port = unique_port();
    let server_addr = format!("127.0.0.1:{port}");
    let _server = Server::start(Some(&ns), &server_addr, &["--closer", "client"]);
    let run = client(
        Some(&ns),
        &[
            "--to",
            &server_addr,
            "--count",
            &N.to_string(),
            "--closer",
            "client",
        ],
    );
    assert_eq!(run.local_ports.len(), N);

    let ours = assert_same_as_ss(&ns, port, N);
    let local_ports: BTreeSet<u16> = ours.iter().map(|s| s.conn.local.port()).collect();
    assert_eq!(local_ports, run.local_ports.iter().copied().collect());
    for s in &ours {
        assert_eq!(s.conn.local.ip().to_string(), "127.0.0.1");
        assert_eq!(s.conn.remote, server_addr.parse().unwrap());
    }
    // No other state leaks into a TIME_WAIT dump, and an empty state list asks nothing.
    assert!(dump_in(&ns, &[]).is_empty());
}

/// A dual-stack server that closes first holds the TIME_WAIT sockets: IPv6 ones for `::1`
/// clients and v4-mapped ones (AF_INET6 sockets) for 127.0.0.1 clients, shown as IPv4.
#[test]
fn ipv6_and_v4_mapped_time_wait_match_ss() {
    require_root_user();
    const N: usize = 3;
    let ns = Netns::new("sd-v6");
    let port = unique_port();
    let _server = Server::start(Some(&ns), &format!("[::]:{port}"), &["--closer", "server"]);
    for to in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
        client(
            Some(&ns),
            &["--to", &to, "--count", &N.to_string(), "--closer", "server"],
        );
    }
    let ours = assert_same_as_ss(&ns, port, 2 * N);
    let v4 = ours
        .iter()
        .filter(|s| s.conn.local == format!("127.0.0.1:{port}").parse().unwrap())
        .count();
    let v6 = ours
        .iter()
        .filter(|s| s.conn.local == format!("[::1]:{port}").parse().unwrap())
        .count();
    assert_eq!((v4, v6), (N, N), "{ours:#?}");
}

/// A `--hold` server keeps 3 CLOSE_WAIT sockets: sock_diag lists exactly those, and
/// socket_owners maps each inode to the server's pid.
#[test]
fn close_wait_sockets_map_to_the_holding_server() {
    require_root_user();
    let ns = Netns::new("sd-cw");
    let port = unique_port();
    let server_addr = format!("127.0.0.1:{port}");
    let server = Server::start(Some(&ns), &server_addr, &["--hold"]);
    assert_eq!(
        in_netns(&ns, sockdiag::listening_ports).expect("listening ports"),
        HashSet::from([port])
    );
    client(Some(&ns), &["--to", &server_addr, "--count", "3", "--hold"]);

    // A child still in the accept queue has no file yet (inode 0): wait, bounded, until the
    // server accepted all three.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (close_wait, owners) = loop {
        let cw = dump_in(&ns, &[8]);
        let inodes: HashSet<u32> = cw.iter().map(|s| s.inode).collect();
        let owners = sockdiag::socket_owners(&inodes);
        let done = cw.len() == 3 && !inodes.contains(&0) && owners.len() == 3;
        if done || Instant::now() > deadline {
            break (cw, owners);
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(close_wait.len(), 3, "{close_wait:#?}");
    let inodes: HashSet<u32> = close_wait.iter().map(|s| s.inode).collect();
    assert_eq!(inodes.len(), 3, "three distinct inodes: {close_wait:#?}");
    for s in &close_wait {
        assert_eq!(s.state, 8, "{s:?}");
        assert_eq!(s.conn.local, server_addr.parse().unwrap(), "{s:?}");
        assert_eq!(s.uid, 0, "the server runs as root: {s:?}");
        let (pid, comm) = owners
            .get(&s.inode)
            .unwrap_or_else(|| panic!("no owner for {s:?}: {owners:?}"));
        assert_eq!(*pid, server.pid, "{s:?}");
        assert_eq!(comm, "twt-churn");
    }
    // The clients' ends: closed with the FIN unacknowledged at first (FIN_WAIT1, the
    // retransmit timer in expires_ms), because a socket entering CLOSE_WAIT switches to
    // pingpong mode and delays its ACK of the FIN. Once acked, an orphaned FIN_WAIT2 socket
    // becomes a timewait socket in the FIN_WAIT2 substate: listed under state 5, never under
    // TIME_WAIT (6), with no inode.
    let deadline = Instant::now() + Duration::from_secs(10);
    let fin_wait2 = loop {
        let fw2 = dump_in(&ns, &[5]);
        if fw2.len() >= 3 || Instant::now() > deadline {
            break fw2;
        }
        thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(fin_wait2.len(), 3, "{fin_wait2:#?}");
    for s in &fin_wait2 {
        assert_eq!(s.conn.remote, server_addr.parse().unwrap(), "{s:?}");
        assert_eq!(s.inode, 0, "{s:?}");
        assert!(s.expires_ms <= 60_000, "{s:?}");
    }
    assert!(dump_in(&ns, &[6]).is_empty());
}
