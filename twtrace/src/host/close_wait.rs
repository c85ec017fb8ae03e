//! CLOSE_WAIT sockets per process and namespace: the kernel's socket table (sock_diag, read in
//! each network namespace) joined with the processes holding them (/proc/PID/fd; socket inodes
//! are unique across namespaces, so one walk of /proc serves them all).

use std::collections::{HashMap, HashSet};

use super::{
    netns::{self, Netns, Unreadable},
    sockdiag::{self, DiagSocket, state},
};

/// Shown as the holder when the process holding a socket cannot be seen (another user's
/// process while twtrace runs without CAP_SYS_PTRACE).
pub const HOLDER_NOT_VISIBLE: &str = "(holder not visible)";
/// Shown as the holder of sockets waiting in a listener's accept queue whose listener cannot
/// be found either.
pub const NOT_ACCEPTED: &str = "(not accepted)";

/// CLOSE_WAIT sockets held by one process in one namespace.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CloseWait {
    /// Inode number of the network namespace.
    pub netns: u32,
    /// The holder (0 when it cannot be seen: `comm` says why).
    pub pid: u32,
    pub comm: String,
    pub sockets: u64,
    /// Set when these sockets were never accepted: they wait in the accept queue of the
    /// listener on this local port, whose owner `pid` is (a full backlog: the process stopped
    /// calling accept(), it did not forget close()).
    pub listener_port: Option<u16>,
}

/// What one namespace's table says: its CLOSE_WAIT sockets, and its listeners (for the sockets
/// still in an accept queue).
struct Table {
    close_wait: Vec<DiagSocket>,
    listeners: Vec<DiagSocket>,
}

fn read_here() -> std::io::Result<Table> {
    Ok(Table {
        close_wait: sockdiag::dump(&[state::CLOSE_WAIT])?,
        listeners: sockdiag::dump(&[state::LISTEN])?,
    })
}

/// CLOSE_WAIT sockets per process now, in every namespace of `targets`, largest first, and the
/// namespaces that could not be read. A CLOSE_WAIT socket is one whose peer closed and whose
/// process has not called close(): only the process that holds it can say. Sockets no process
/// holds yet (inode 0: still in a listener's accept queue) are charged to the listener's owner
/// with `listener_port` set.
pub fn by_process(targets: &[Netns]) -> (Vec<CloseWait>, Vec<(u32, Unreadable)>) {
    let mut tables = Vec::new();
    let mut unreadable = Vec::new();
    for (inode, r) in netns::in_each(targets, |_| read_here()) {
        match r {
            Ok(Ok(t)) => tables.push((inode, t)),
            Ok(Err(e)) => unreadable.push((inode, Unreadable::Other(format!("sock_diag: {e}")))),
            Err(Unreadable::Gone) => {}
            Err(e) => unreadable.push((inode, e)),
        }
    }
    unreadable.sort_by_key(|(i, _)| *i);
    (join_holders(&tables), unreadable)
}

/// Joins each namespace's sockets with their holders, found through /proc.
fn join_holders(tables: &[(u32, Table)]) -> Vec<CloseWait> {
    let mut inodes: HashSet<u32> = HashSet::new();
    for (
        _,
        Table {
            close_wait,
            listeners,
        },
    ) in tables
    {
        inodes.extend(close_wait.iter().map(|s| s.inode).filter(|&i| i != 0));
        // Listeners matter only where a socket waits in an accept queue.
        if close_wait.iter().any(|s| s.inode == 0) {
            inodes.extend(listeners.iter().map(|s| s.inode).filter(|&i| i != 0));
        }
    }
    let owners = sockdiag::socket_owners(&inodes);
    group(tables, &owners)
}

/// Counts per (namespace, holder, listener port). Pure.
fn group(tables: &[(u32, Table)], owners: &HashMap<u32, (u32, String)>) -> Vec<CloseWait> {
    let mut counts: HashMap<(u32, u32, String, Option<u16>), u64> = HashMap::new();
    for (
        netns,
        Table {
            close_wait,
            listeners,
        },
    ) in tables
    {
        for s in close_wait {
            let key = if s.inode == 0 {
                // A child still in the accept queue has the listener's local port.
                let port = s.conn.local.port();
                let holder = listeners
                    .iter()
                    .find(|l| l.conn.local.port() == port)
                    .and_then(|l| owners.get(&l.inode));
                match holder {
                    Some((pid, comm)) => (*netns, *pid, comm.clone(), Some(port)),
                    None => (*netns, 0, NOT_ACCEPTED.to_owned(), Some(port)),
                }
            } else {
                match owners.get(&s.inode) {
                    Some((pid, comm)) => (*netns, *pid, comm.clone(), None),
                    None => (*netns, 0, HOLDER_NOT_VISIBLE.to_owned(), None),
                }
            };
            *counts.entry(key).or_default() += 1;
        }
    }
    let mut out: Vec<CloseWait> = counts
        .into_iter()
        .map(|((netns, pid, comm, listener_port), sockets)| CloseWait {
            netns,
            pid,
            comm,
            sockets,
            listener_port,
        })
        .collect();
    out.sort_by(|a, b| {
        b.sockets
            .cmp(&a.sockets)
            .then(a.netns.cmp(&b.netns))
            .then(a.pid.cmp(&b.pid))
            .then(a.listener_port.cmp(&b.listener_port))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::decode::Conn;

    fn sock(local: &str, remote: &str, st: u8, inode: u32) -> DiagSocket {
        DiagSocket {
            conn: Conn {
                local: local.parse().unwrap(),
                remote: remote.parse().unwrap(),
            },
            state: st,
            timer: 0,
            expires_ms: 0,
            inode,
            uid: 0,
        }
    }

    #[test]
    fn holders_per_namespace_and_accept_queues_charged_to_the_listener() {
        let a = 4026532281;
        let b = 4026532282;
        let cw = |l: &str, inode| sock(l, "10.0.0.9:5000", state::CLOSE_WAIT, inode);
        let tables = vec![
            (
                a,
                Table {
                    close_wait: vec![
                        cw("10.0.0.1:8080", 0),
                        cw("10.0.0.1:8080", 0),
                        cw("10.0.0.1:40000", 11),
                        cw("10.0.0.1:40001", 12),
                    ],
                    listeners: vec![sock("0.0.0.0:8080", "0.0.0.0:0", state::LISTEN, 50)],
                },
            ),
            // The same holder pid cannot be in two namespaces, but the same 4-tuple can.
            (
                b,
                Table {
                    close_wait: vec![cw("10.0.0.1:40000", 13), cw("10.0.0.1:9", 0)],
                    listeners: vec![],
                },
            ),
        ];
        let owners: HashMap<u32, (u32, String)> = [
            (11, (100, "client".to_owned())),
            (12, (100, "client".to_owned())),
            (50, (200, "server".to_owned())),
        ]
        .into_iter()
        .collect();
        let got = group(&tables, &owners);
        let cw = |netns, pid, comm: &str, sockets, listener_port| CloseWait {
            netns,
            pid,
            comm: comm.into(),
            sockets,
            listener_port,
        };
        assert_eq!(
            got,
            vec![
                cw(a, 100, "client", 2, None),
                cw(a, 200, "server", 2, Some(8080)),
                cw(b, 0, HOLDER_NOT_VISIBLE, 1, None),
                cw(b, 0, NOT_ACCEPTED, 1, Some(9)),
            ]
        );
    }
}
