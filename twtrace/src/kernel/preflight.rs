//! Everything checked before anything is loaded into the kernel, so that a bad environment gets
//! one clear line and leaves nothing behind: privileges, kernel version, lockdown, BTF offsets
//! and kallsyms. Every program is a BTF tracepoint: no tracefs, no record layout to check.

use std::{fs, io::ErrorKind};

use crate::{
    failure::{Code, Failure},
    kernel::btf::Btf,
};

const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYSLOG: u32 = 34;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Ring buffer maps and `bpf_probe_read_kernel` arrived in 5.8 and 5.5.
const MIN_KERNEL: (u32, u32) = (5, 8);

/// What the programs need to know about the running kernel.
#[derive(Debug, Clone, Default)]
pub struct KernelInfo {
    pub release: String,
    pub tw_timer_fn: u64,
    pub reqsk_timer_fn: u64,
    pub off_tw_timer: u32,
    pub off_rsk_timer: u32,
    pub off_timer_function: u32,
    pub off_timer_expires: u32,
    pub off_sk_protocol: u32,
    pub off_inet_sport: u32,
    pub off_skc_v6_daddr: u32,
    pub off_skc_v6_rcv_saddr: u32,
    /// `sock_common.skc_net` and `net.ns.inum` (0, 0 on a kernel without network namespaces).
    pub off_skc_net: u32,
    pub off_net_inum: u32,
    /// `inet_timewait_sock.tw_substate`, `sock.sk_err`, `task_struct.tgid`.
    pub off_tw_substate: u32,
    pub off_sk_err: u32,
    pub off_task_tgid: u32,
    /// `lockdown=confidentiality`: only typed loads (see `lockdown_confidentiality`).
    pub confidentiality: bool,
}

pub fn check() -> Result<KernelInfo, Failure> {
    check_privileges(effective_caps()?)?;
    let release = kernel_release();
    check_kernel_version(&release)?;
    let confidentiality = lockdown_confidentiality(
        &fs::read_to_string("/sys/kernel/security/lockdown").unwrap_or_default(),
    );
    let mut info = btf_offsets()?;
    info.release = release;
    info.confidentiality = confidentiality;
    let (tw, reqsk) = kallsyms()?;
    info.tw_timer_fn = tw;
    info.reqsk_timer_fn = reqsk;
    Ok(info)
}

/// Whether the kernel is locked down in confidentiality mode. `lockdown=confidentiality`
/// removes `bpf_probe_read_kernel` from tracing programs (LOCKDOWN_BPF_READ_KERNEL,
/// kernel/trace/bpf_trace.c): the programs then load with typed loads only
/// (`Config.typed_only`), and the timer programs cannot read the timewait socket behind a
/// timer. `integrity` (Secure Boot's default on Debian) allows everything twtrace uses. The
/// file (securityfs) reads `none [integrity] confidentiality`, the mode in force in brackets;
/// no file means no lockdown support.
pub fn lockdown_confidentiality(text: &str) -> bool {
    text.contains("[confidentiality]")
}

/// What twtrace cannot see under `lockdown=confidentiality`, said once on stderr.
pub const CONFIDENTIALITY_LIMITS: &str = "the kernel is locked down in confidentiality mode \
     (lockdown=confidentiality): BPF programs may not read kernel memory, so twtrace reads only \
     what the tracepoints hand over: births and ends are exact, but the FIN_WAIT2 substate is \
     told only by its timeout (not when tcp_fin_timeout is 60 s) and TIME_WAIT sockets that \
     existed before start end at their deadline as expired, or as killed when their namespace \
     goes (lockdown=integrity has none of these limits)";

fn effective_caps() -> Result<u64, Failure> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|e| Failure::new(Code::Error, format!("cannot read /proc/self/status: {e}")))?;
    Ok(parse_cap_eff(&status).unwrap_or(0))
}

pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

/// Loading and attaching BTF tracepoints (no tracefs), and reading kernel addresses.
pub fn check_privileges(caps: u64) -> Result<(), Failure> {
    let bpf = has(caps, CAP_SYS_ADMIN) || (has(caps, CAP_BPF) && has(caps, CAP_PERFMON));
    let mut missing = Vec::new();
    if !bpf {
        if !has(caps, CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(caps, CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    if !has(caps, CAP_SYSLOG) {
        missing.push("CAP_SYSLOG (kernel addresses in /proc/kallsyms)");
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(Failure::new(
        Code::Privilege,
        format!(
            "missing privilege: {} not in the effective set; run twtrace as root (sudo twtrace ...)",
            missing.join(", ")
        ),
    ))
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

pub fn check_kernel_version(release: &str) -> Result<(), Failure> {
    match parse_release(release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        _ => Err(Failure::new(
            Code::Kernel,
            format!(
                "kernel {release} is too old: twtrace needs Linux {}.{} or newer (BPF ring buffer)",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        )),
    }
}

fn btf_offsets() -> Result<KernelInfo, Failure> {
    let missing = |why: String| {
        Failure::new(
            Code::Kernel,
            format!(
                "{why}: twtrace reads kernel struct offsets from BTF; use a kernel built with \
                 CONFIG_DEBUG_INFO_BTF=y"
            ),
        )
    };
    let btf = match Btf::from_sys_fs() {
        Ok(Ok(btf)) => btf,
        Ok(Err(e)) => return Err(missing(format!("/sys/kernel/btf/vmlinux: {e}"))),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(missing(
                "BTF missing (/sys/kernel/btf/vmlinux absent)".into(),
            ));
        }
        Err(e) => return Err(missing(format!("cannot read /sys/kernel/btf/vmlinux: {e}"))),
    };
    offsets_from(&btf).map_err(|e| missing(e.to_string()))
}

pub fn offsets_from(btf: &Btf) -> Result<KernelInfo, crate::kernel::btf::BtfError> {
    let v6 = btf.has_struct("in6_addr");
    // Without CONFIG_NET_NS, possible_net_t is empty: every socket is in the one namespace.
    let (off_skc_net, off_net_inum) = match btf.member_offset("sock_common", "skc_net") {
        Ok(skc_net) => (
            skc_net,
            btf.member_offset("net", "ns")? + btf.member_offset("ns_common", "inum")?,
        ),
        Err(_) => (0, 0),
    };
    Ok(KernelInfo {
        confidentiality: false,
        off_skc_net,
        off_net_inum,
        off_tw_substate: btf.member_offset("inet_timewait_sock", "tw_substate")?,
        off_sk_err: btf.member_offset("sock", "sk_err")?,
        off_task_tgid: btf.member_offset("task_struct", "tgid")?,
        off_tw_timer: btf.member_offset("inet_timewait_sock", "tw_timer")?,
        off_rsk_timer: btf.member_offset("request_sock", "rsk_timer")?,
        off_timer_function: btf.member_offset("timer_list", "function")?,
        off_timer_expires: btf.member_offset("timer_list", "expires")?,
        off_sk_protocol: btf.member_offset("sock", "sk_protocol")?,
        off_inet_sport: btf.member_offset("inet_sock", "inet_sport")?,
        off_skc_v6_daddr: if v6 {
            btf.member_offset("sock_common", "skc_v6_daddr")?
        } else {
            0
        },
        off_skc_v6_rcv_saddr: if v6 {
            btf.member_offset("sock_common", "skc_v6_rcv_saddr")?
        } else {
            0
        },
        ..KernelInfo::default()
    })
}

fn kallsyms() -> Result<(u64, u64), Failure> {
    let text = fs::read_to_string("/proc/kallsyms")
        .map_err(|e| Failure::new(Code::Kernel, format!("cannot read /proc/kallsyms: {e}")))?;
    kallsyms_from(&text, &kptr_restrict())
}

fn kptr_restrict() -> String {
    fs::read_to_string("/proc/sys/kernel/kptr_restrict")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

pub fn kallsyms_from(text: &str, kptr_restrict: &str) -> Result<(u64, u64), Failure> {
    let mut tw = None;
    let mut reqsk = None;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(addr), Some(_ty), Some(name)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        let slot = match name {
            "tw_timer_handler" => &mut tw,
            "reqsk_timer_handler" => &mut reqsk,
            _ => continue,
        };
        *slot = u64::from_str_radix(addr, 16).ok();
        if tw.is_some() && reqsk.is_some() {
            break;
        }
    }
    match (tw, reqsk) {
        (Some(0), _) => Err(Failure::new(
            Code::Kernel,
            format!(
                "/proc/kallsyms hides kernel addresses (kernel.kptr_restrict = {kptr_restrict}): \
                 run as root with CAP_SYSLOG, and if it is 2 set `sysctl kernel.kptr_restrict=1`"
            ),
        )),
        (Some(tw), reqsk) => Ok((tw, reqsk.unwrap_or(0))),
        (None, _) => Err(Failure::new(
            Code::Kernel,
            "tw_timer_handler is not in /proc/kallsyms: this kernel's TIME_WAIT timer is not \
             the one twtrace knows (Linux 5.8+ with CONFIG_KALLSYMS)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = u64::MAX >> 23;

    #[test]
    fn privileges_name_what_is_missing() {
        assert!(check_privileges(ALL).is_ok());
        let e = check_privileges(0).unwrap_err();
        assert_eq!(e.code, Code::Privilege);
        assert!(e.message.contains("CAP_BPF") && e.message.contains("CAP_PERFMON"));
        assert!(e.message.contains("root"));
        // CAP_SYS_ADMIN stands in for BPF + PERFMON.
        let admin = 1 << CAP_SYS_ADMIN | 1 << CAP_SYSLOG;
        assert!(check_privileges(admin).is_ok());
        // No tracefs is read: no CAP_DAC_READ_SEARCH (2) or CAP_DAC_OVERRIDE (1) needed.
        assert!(check_privileges(ALL & !0b110).is_ok());
        let no_syslog = ALL & !(1 << CAP_SYSLOG);
        assert!(
            check_privileges(no_syslog)
                .unwrap_err()
                .message
                .contains("CAP_SYSLOG")
        );
    }

    #[test]
    fn lockdown_confidentiality_is_recognised() {
        assert!(!lockdown_confidentiality(
            "none [integrity] confidentiality\n"
        ));
        assert!(!lockdown_confidentiality(
            "[none] integrity confidentiality\n"
        ));
        assert!(
            !lockdown_confidentiality(""),
            "no securityfs: no lockdown to see"
        );
        assert!(lockdown_confidentiality(
            "none integrity [confidentiality]\n"
        ));
        assert!(CONFIDENTIALITY_LIMITS.contains("lockdown=confidentiality"));
    }

    #[test]
    fn cap_eff_parses_from_status() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
    }

    #[test]
    fn kernel_versions() {
        assert_eq!(parse_release("6.18.44-fc-v669"), Some((6, 18)));
        assert!(check_kernel_version("6.18.44").is_ok());
        assert!(check_kernel_version("5.8.0").is_ok());
        let e = check_kernel_version("5.4.0-150-generic").unwrap_err();
        assert_eq!(e.code, Code::Kernel);
        assert!(e.message.contains("5.4.0-150-generic"));
        assert!(check_kernel_version("garbage").is_err());
    }

    #[test]
    fn kallsyms_finds_exact_names_and_sees_hidden_addresses() {
        let text = "ffffffff820089e0 t __pfx_tw_timer_handler\n\
                    ffffffff820089f0 t tw_timer_handler\n\
                    ffffffff8200af30 t reqsk_timer_handler\n";
        assert_eq!(
            kallsyms_from(text, "0").unwrap(),
            (0xffffffff820089f0, 0xffffffff8200af30)
        );
        let hidden = "0000000000000000 t tw_timer_handler\n";
        let e = kallsyms_from(hidden, "2").unwrap_err();
        assert!(e.message.contains("kptr_restrict = 2"), "{}", e.message);
        let e = kallsyms_from("ffffffff81000000 T _stext\n", "0").unwrap_err();
        assert!(e.message.contains("tw_timer_handler is not"));
    }
}
