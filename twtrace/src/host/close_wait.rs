//! CLOSE_WAIT sockets per process: the kernel's socket table (sock_diag) joined with the
//! processes holding them (/proc/PID/fd).

use std::collections::{HashMap, HashSet};

use super::sockdiag::{self, state};

/// CLOSE_WAIT sockets held by one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseWait {
    pub pid: u32,
    pub comm: String,
    pub sockets: u64,
}

/// CLOSE_WAIT sockets per process now (sock_diag, then /proc/*/fd for the holders), largest
/// first. A CLOSE_WAIT socket is one whose peer closed and whose process has not called
/// close(): only the process that holds it can say. Sockets no process holds yet (not yet
/// accepted: inode 0) and sockets whose holder cannot be seen (another user's process, once
/// `serve` runs unprivileged) are shown as pid 0 with a name that says which.
pub fn close_wait_by_process() -> Vec<CloseWait> {
    let Ok(sockets) = sockdiag::dump(&[state::CLOSE_WAIT]) else {
        return Vec::new();
    };
    let inodes: HashSet<u32> = sockets
        .iter()
        .map(|s| s.inode)
        .filter(|&i| i != 0)
        .collect();
    let owners = sockdiag::socket_owners(&inodes);
    let mut by_pid: HashMap<(u32, String), u64> = HashMap::new();
    for s in &sockets {
        let key = match owners.get(&s.inode) {
            Some(o) => o.clone(),
            None if s.inode == 0 => (0, "(not accepted)".to_owned()),
            None => (0, "(holder not visible)".to_owned()),
        };
        *by_pid.entry(key).or_default() += 1;
    }
    let mut out: Vec<CloseWait> = by_pid
        .into_iter()
        .map(|((pid, comm), sockets)| CloseWait { pid, comm, sockets })
        .collect();
    out.sort_by(|a, b| b.sockets.cmp(&a.sockets).then(a.pid.cmp(&b.pid)));
    out
}
