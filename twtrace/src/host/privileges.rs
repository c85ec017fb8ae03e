//! Giving up root once the kernel programs are attached: `serve` keeps its open map, ring
//! buffer and program descriptors, which need no privilege to use (since Linux 6.5 only map
//! creation and program loading check CAP_BPF), and runs its HTTP side as an ordinary user.

use std::ffi::CString;

use crate::failure::{Code, Failure};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
}

/// A user name (or a numeric uid) from the password database.
pub fn lookup(user: &str) -> Result<Account, Failure> {
    if let Ok(uid) = user.parse::<u32>() {
        return Ok(Account { uid, gid: uid });
    }
    let name = CString::new(user)
        .map_err(|_| Failure::new(Code::Usage, format!("'{user}' is not a user name")))?;
    // SAFETY: getpwnam_r writes into our buffers only; result points into `pw` or is null.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(Failure::new(
            Code::Usage,
            format!("user '{user}' does not exist: pick another with --user"),
        ));
    }
    Ok(Account {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

/// Drops to `account` for good: no supplementary groups, real/effective/saved ids changed (the
/// kernel then clears the permitted and effective capabilities), and no_new_privs so that no
/// execve can bring them back. The bounding set is emptied too where twtrace holds CAP_SETPCAP
/// (plain root); in a container without it, it stays as it was, which no_new_privs and the
/// empty inheritable and ambient sets make harmless.
pub fn drop_to(account: Account) -> Result<(), Failure> {
    if account.uid == 0 {
        return Err(Failure::new(
            Code::Usage,
            "--user must name an unprivileged user, not root",
        ));
    }
    let fail = |what: &str| {
        Failure::new(
            Code::Privilege,
            format!(
                "cannot drop privileges ({what}: {}); twtrace serve must start as root",
                std::io::Error::last_os_error()
            ),
        )
    };
    // SAFETY: plain prctl/set*id calls; glibc applies the id changes to every thread.
    unsafe {
        // Needs CAP_SETPCAP, so before the uid change.
        for cap in 0..64 {
            libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0);
        }
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail("setgroups"));
        }
        if libc::setresgid(account.gid, account.gid, account.gid) != 0 {
            return Err(fail("setresgid"));
        }
        if libc::setresuid(account.uid, account.uid, account.uid) != 0 {
            return Err(fail("setresuid"));
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(fail("no_new_privs"));
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    match crate::kernel::preflight::parse_cap_eff(&status) {
        Some(0) => Ok(()),
        other => Err(Failure::new(
            Code::Privilege,
            format!("capabilities remain after dropping privileges ({other:?}); refusing to serve"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_users() {
        assert_eq!(lookup("root"), Ok(Account { uid: 0, gid: 0 }));
        assert_eq!(lookup("65534").map(|a| a.uid), Ok(65534));
        let e = lookup("no-such-user-here").unwrap_err();
        assert!(e.message.contains("'no-such-user-here' does not exist"));
        assert!(drop_to(Account { uid: 0, gid: 0 }).is_err());
    }
}
