//! Everything checked before anything is loaded into the kernel, so that a bad environment gets
//! one clear line and leaves nothing behind: privileges, kernel version, BTF offsets, kallsyms,
//! tracefs and the tracepoint record layouts.

use std::{
    ffi::CString,
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
};

use twtrace_common::tp;

use crate::{
    failure::{Code, Failure},
    kernel::btf::Btf,
};

const CAP_DAC_OVERRIDE: u32 = 1;
const CAP_DAC_READ_SEARCH: u32 = 2;
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
    pub tracefs: PathBuf,
    /// Set when twtrace mounted tracefs itself.
    pub mounted_tracefs: bool,
}

/// `fork`: the one classic tracepoint, sched:sched_process_fork (`exec`), will be attached: it
/// needs tracefs and a known record layout. The BTF tracepoints need neither.
pub fn check(fork: bool) -> Result<KernelInfo, Failure> {
    check_privileges(effective_caps()?, fork)?;
    let release = kernel_release();
    check_kernel_version(&release)?;
    let mut info = btf_offsets()?;
    info.release = release;
    let (tw, reqsk) = kallsyms()?;
    info.tw_timer_fn = tw;
    info.reqsk_timer_fn = reqsk;
    if fork {
        let (tracefs, mounted) = tracefs()?;
        check_formats(&tracefs)?;
        info.tracefs = tracefs;
        info.mounted_tracefs = mounted;
    }
    Ok(info)
}

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

/// `tracefs`: a classic tracepoint will be attached (its id and format are read from tracefs,
/// mode 0700). BTF tracepoints need no tracefs.
pub fn check_privileges(caps: u64, tracefs: bool) -> Result<(), Failure> {
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
    if tracefs && !has(caps, CAP_DAC_READ_SEARCH) && !has(caps, CAP_DAC_OVERRIDE) {
        missing.push("CAP_DAC_READ_SEARCH (tracefs)");
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
        off_skc_net,
        off_net_inum,
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

/// The tracefs mount point, mounting it at /sys/kernel/tracing when nothing is mounted.
fn tracefs() -> Result<(PathBuf, bool), Failure> {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if let Some(p) = tracefs_from_mounts(&mounts) {
        return Ok((p, false));
    }
    let target = Path::new("/sys/kernel/tracing");
    let fail = |why: String| {
        Failure::new(
            Code::Tracefs,
            format!(
                "tracefs is not mounted and cannot be mounted ({why}); mount it with \
                 `mount -t tracefs nodev /sys/kernel/tracing`, or run twtrace where /sys is \
                 writable by root"
            ),
        )
    };
    if !target.is_dir() {
        return Err(fail(format!("{} does not exist", target.display())));
    }
    let src = CString::new("nodev").expect("no NUL");
    let dst = CString::new("/sys/kernel/tracing").expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fail(format!("mount: {}", std::io::Error::last_os_error())));
    }
    Ok((target.to_path_buf(), true))
}

pub fn tracefs_from_mounts(mounts: &str) -> Option<PathBuf> {
    let mut found: Option<PathBuf> = None;
    for line in mounts.lines() {
        let mut it = line.split_whitespace();
        let (_src, Some(dir), Some(fstype)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if fstype == "tracefs" {
            let dir = PathBuf::from(dir.replace("\\040", " "));
            // /sys/kernel/tracing is the canonical place; the debugfs one is a fallback.
            if dir == Path::new("/sys/kernel/tracing") || found.is_none() {
                found = Some(dir);
            }
        }
    }
    found
}

/// The classic tracepoint whose record a program reads. (The others are BTF tracepoints: no
/// record, no tracefs; the verifier checks their arguments' types against the kernel's BTF.)
const FORK_TRACEPOINT: (&str, &str, &[tp::Field]) = (
    "sched",
    "sched_process_fork",
    tp::sched_process_fork::FIELDS,
);

fn check_formats(tracefs: &Path) -> Result<(), Failure> {
    let (category, name, fields) = FORK_TRACEPOINT;
    let path = tracefs
        .join("events")
        .join(category)
        .join(name)
        .join("format");
    let text = fs::read_to_string(&path).map_err(|e| {
        let code = if e.kind() == ErrorKind::PermissionDenied {
            Code::Privilege
        } else {
            Code::Kernel
        };
        Failure::new(
            code,
            format!(
                "cannot read tracepoint {category}:{name} ({}): {e}",
                path.display()
            ),
        )
    })?;
    check_format(category, name, &text, fields)
}

/// `field:TYPE NAME; offset:N; size:N; signed:N;` lines (tab separated) -> (name, offset,
/// size).
pub fn parse_format(text: &str) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut name = None;
        let mut offset = None;
        let mut size = None;
        for part in line.trim().split(';') {
            let part = part.trim();
            if let Some(decl) = part.strip_prefix("field:") {
                name = decl
                    .split_whitespace()
                    .last()
                    .map(|n| n.split('[').next().unwrap_or(n).to_owned());
            } else if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        if let (Some(n), Some(o), Some(s)) = (name, offset, size) {
            out.push((n, o, s));
        }
    }
    out
}

pub fn check_format(
    category: &str,
    name: &str,
    text: &str,
    want: &[tp::Field],
) -> Result<(), Failure> {
    let have = parse_format(text);
    for &(field, offset, size) in want {
        let found = have.iter().find(|(n, _, _)| n == field);
        if found.map(|(_, o, s)| (*o, *s)) != Some((offset, size)) {
            let seen = match found {
                Some((_, o, s)) => format!("offset {o} size {s}"),
                None => "no such field".into(),
            };
            return Err(Failure::new(
                Code::Kernel,
                format!(
                    "tracepoint {category}:{name} has an unexpected layout (field {field}: {seen}, \
                     expected offset {offset} size {size}); this kernel is not supported yet"
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = u64::MAX >> 23;

    #[test]
    fn privileges_name_what_is_missing() {
        assert!(check_privileges(ALL, true).is_ok());
        let e = check_privileges(0, true).unwrap_err();
        assert_eq!(e.code, Code::Privilege);
        assert!(e.message.contains("CAP_BPF") && e.message.contains("CAP_PERFMON"));
        assert!(e.message.contains("root"));
        // CAP_SYS_ADMIN stands in for BPF + PERFMON.
        let admin = 1 << CAP_SYS_ADMIN | 1 << CAP_SYSLOG | 1 << CAP_DAC_READ_SEARCH;
        assert!(check_privileges(admin, true).is_ok());
        // Without a classic tracepoint, no tracefs, no CAP_DAC_READ_SEARCH.
        let no_dac = ALL & !(1 << CAP_DAC_READ_SEARCH) & !(1 << CAP_DAC_OVERRIDE);
        assert!(check_privileges(no_dac, false).is_ok());
        assert!(
            check_privileges(no_dac, true)
                .unwrap_err()
                .message
                .contains("tracefs")
        );
        let no_syslog = ALL & !(1 << CAP_SYSLOG);
        assert!(
            check_privileges(no_syslog, true)
                .unwrap_err()
                .message
                .contains("CAP_SYSLOG")
        );
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

    #[test]
    fn tracefs_mounts() {
        let m = "sysfs /sys sysfs rw 0 0\ntracefs /sys/kernel/debug/tracing tracefs rw 0 0\n\
                 tracefs /sys/kernel/tracing tracefs rw 0 0\n";
        assert_eq!(
            tracefs_from_mounts(m),
            Some(PathBuf::from("/sys/kernel/tracing"))
        );
        assert_eq!(tracefs_from_mounts("sysfs /sys sysfs rw 0 0\n"), None);
    }

    const TIMER_START_FIELDS: &[tp::Field] = &[
        ("timer", 8, 8),
        ("function", 16, 8),
        ("expires", 24, 8),
        ("now", 40, 8),
    ];

    const TIMER_START: &str = "name: timer_start\nID: 466\nformat:\n\
        \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
        \tfield:void * timer;\toffset:8;\tsize:8;\tsigned:0;\n\
        \tfield:void * function;\toffset:16;\tsize:8;\tsigned:0;\n\
        \tfield:unsigned long expires;\toffset:24;\tsize:8;\tsigned:0;\n\
        \tfield:unsigned long bucket_expiry;\toffset:32;\tsize:8;\tsigned:0;\n\
        \tfield:unsigned long now;\toffset:40;\tsize:8;\tsigned:0;\n\
        \tfield:__u8 saddr[4];\toffset:48;\tsize:4;\tsigned:0;\n";

    #[test]
    fn formats_parse_and_check() {
        let f = parse_format(TIMER_START);
        assert!(f.contains(&("function".into(), 16, 8)));
        assert!(f.contains(&("saddr".into(), 48, 4)));
        assert!(check_format("timer", "timer_start", TIMER_START, TIMER_START_FIELDS).is_ok());
        // A kernel before 5.11 had no bucket_expiry: `now` sat at 32.
        let old = TIMER_START
            .replace(
                "\tfield:unsigned long bucket_expiry;\toffset:32;\tsize:8;\tsigned:0;\n",
                "",
            )
            .replace("offset:40", "offset:32");
        let e = check_format("timer", "timer_start", &old, TIMER_START_FIELDS).unwrap_err();
        assert!(
            e.message.contains("field now: offset 32 size 8"),
            "{}",
            e.message
        );
    }

    #[test]
    fn running_kernel_formats_match_when_tracefs_is_readable() {
        let Some(tracefs) = tracefs_from_mounts(&fs::read_to_string("/proc/self/mounts").unwrap())
        else {
            eprintln!("tracefs not mounted here: skipped");
            return;
        };
        if let Err(e) = check_formats(&tracefs) {
            assert_eq!(e.code, Code::Privilege, "{}", e.message);
        }
    }
}
