//! The kernel side as userspace sees it: load, configure, attach, read counters, detach.
//!
//! Detaching needs no code to be safe: every link belongs to the `Ebpf` object, and the kernel
//! drops a tracepoint link when its last file descriptor closes, so normal exit, an error
//! during attach, a panic and SIGKILL all leave nothing behind. `detach` exists to close a
//! session's window at its end: the programs stay loaded (their counters and statistics
//! readable) but run no more.

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, tp_btf::BtfTracePointLinkId},
};
use twtrace_common::{Config, counter};

use crate::{
    failure::{Code, Failure},
    kernel::preflight::{self, KernelInfo},
};

/// The kernel programs, as built by build.rs (`twtrace --version` names them by their SHA-256).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/twtrace-ebpf"));

/// (program, BTF tracepoint): every program is a BTF tracepoint (a raw tracepoint typed by the
/// kernel's BTF, attached through bpf(): no tracefs).
pub const PROGRAMS: [(&str, &str); 4] = [
    ("inet_sock_set_state", "inet_sock_set_state"),
    ("timer_start", "timer_start"),
    ("timer_cancel", "timer_cancel"),
    ("timer_expire_entry", "timer_expire_entry"),
];

/// The benchmark's floor (`--hooks-only`): programs that return at once, on the same hooks.
pub const HOOKS_ONLY: [(&str, &str); 4] = [
    ("hook_state", "inet_sock_set_state"),
    ("hook_timer_start", "timer_start"),
    ("hook_timer_cancel", "timer_cancel"),
    ("hook_timer_expire", "timer_expire_entry"),
];

/// Attached only when a process tree is tracked (`exec`).
pub const FORK_PROGRAM: (&str, &str) = ("sched_process_fork", "sched_process_fork");

#[derive(Debug, Clone, Default)]
pub struct ProbeOptions {
    pub ring_size: u32,
    /// `--ring-size` as the user typed it, for messages.
    pub ring_size_typed: String,
    /// Emit every TCP state transition (watch --all-states).
    pub emit_states: bool,
    /// Follow a process tree through its forks (`exec`).
    pub track_forks: bool,
    /// Attach `HOOKS_ONLY` instead of the real programs: nothing is traced (the benchmark's
    /// floor, `--hooks-only`).
    pub hooks_only: bool,
    /// Log the kernel programs' rare paths (aya-log) on stderr (`--debug-kernel`).
    pub debug_kernel: bool,
    /// On a load failure, print the verifier's whole log, not its first line (`--verbose`).
    pub verbose: bool,
    /// Load with typed loads only, as under `lockdown=confidentiality` (which turns it on by
    /// itself): the hidden `--typed-only` lets the tests run that mode on any kernel.
    pub typed_only: bool,
}

/// The kernel programs' own counters, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelCounters {
    pub lost: u64,
    pub emitted: u64,
    pub tw_timer_starts: u64,
    pub birth_unmatched: u64,
    pub close_without_tw: u64,
    pub owner_store_failed: u64,
    pub track_failed: u64,
    pub connect_failed: u64,
}

/// What the kernel keeps per program (BPF_OBJ_GET_INFO_BY_FD).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProgramStats {
    pub name: &'static str,
    pub id: u32,
    /// Filled only while `kernel.bpf_stats_enabled` is 1.
    pub run_time_ns: u64,
    pub run_cnt: u64,
    /// Runs the kernel skipped because a program was already running on that CPU.
    pub recursion_misses: u64,
}

pub struct Probes {
    ebpf: Ebpf,
    pub info: KernelInfo,
    /// Loaded with typed loads only (`Config.typed_only`): the timer events carry no 4-tuple
    /// and no substate.
    pub typed_only: bool,
    /// The kernel programs' log lines (`--debug-kernel`), read when the ring buffer is.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Each attached program and its link, until `detach`.
    links: Vec<(&'static str, BtfTracePointLinkId)>,
}

fn refused(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::new(Code::Refused, format!("the kernel refused to {what}: {e}"))
}

/// An error and its causes on one line (a verifier log is cut to its first line: the whole
/// log is for developers, `RUST_LOG` does not apply here).
fn one_line(e: &dyn std::error::Error) -> String {
    let mut parts = vec![first_line(&e.to_string())];
    let mut cur = e.source();
    while let Some(s) = cur {
        let line = first_line(&s.to_string());
        if !parts.iter().any(|p| p.contains(&line)) {
            parts.push(line);
        }
        cur = s.source();
    }
    parts.join(": ")
}

/// An error and its causes, whole (the verifier's log included).
fn full(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(&format!(": {s}"));
        cur = s.source();
    }
    out
}

/// The kernel programs' log lines, on stderr (the only use of the `log` crate here).
struct KernelLog;

static KERNEL_LOG: KernelLog = KernelLog;

impl log::Log for KernelLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        eprintln!("twtrace: kernel: {}", record.args());
    }

    fn flush(&self) {}
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default();
    match line.find(". Verifier output") {
        Some(i) => line[..i].to_owned(),
        None => line.to_owned(),
    }
}

/// Why a load did not succeed: a failure to report, or the kernel's refusal of
/// `bpf_probe_read_kernel` (lockdown=confidentiality), which a typed-only load avoids.
enum LoadError {
    Failed(Failure),
    ProbeReadRefused,
}

impl From<Failure> for LoadError {
    fn from(f: Failure) -> Self {
        LoadError::Failed(f)
    }
}

/// The verifier's words when a helper is not offered to the program: under
/// lockdown=confidentiality `bpf_tracing_func_proto()` offers no `bpf_probe_read_kernel`
/// (kernel/trace/bpf_trace.c: `security_locked_down(LOCKDOWN_BPF_READ_KERNEL)`), and
/// `check_helper_call()` then refuses the program with `unknown func bpf_probe_read_kernel#113`.
fn refuses_probe_read(e: &aya::programs::ProgramError) -> bool {
    full(e).contains("unknown func bpf_probe_read")
}

impl Probes {
    pub fn attach(opts: ProbeOptions) -> Result<Self, Failure> {
        let mut info = preflight::check()?;
        let typed_only = opts.typed_only || info.confidentiality;
        raise_memlock_limit();
        match Self::load(&opts, info.clone(), typed_only) {
            Ok(p) => Ok(p),
            Err(LoadError::Failed(f)) => Err(f),
            // Lockdown is read from securityfs, which a mount namespace may lack (`ip netns
            // exec` mounts a fresh /sys without it): the kernel's refusal says it all the same.
            // Nothing of the first attempt stays loaded (its object was dropped).
            Err(LoadError::ProbeReadRefused) => {
                info.confidentiality = true;
                Self::load(&opts, info, true).map_err(|e| match e {
                    LoadError::Failed(f) => f,
                    LoadError::ProbeReadRefused => refused(
                        "load the typed-only programs",
                        "bpf_probe_read_kernel is refused, and a typed-only program still \
                         called it (a bug: please report it with --verbose's output)",
                    ),
                })
            }
        }
    }

    fn load(
        opts: &ProbeOptions,
        info: preflight::KernelInfo,
        typed_only: bool,
    ) -> Result<Self, LoadError> {
        let config = Config {
            tw_timer_fn: info.tw_timer_fn,
            reqsk_timer_fn: info.reqsk_timer_fn,
            off_tw_timer: info.off_tw_timer,
            off_rsk_timer: info.off_rsk_timer,
            off_timer_function: info.off_timer_function,
            off_timer_expires: info.off_timer_expires,
            off_sk_protocol: info.off_sk_protocol,
            off_inet_sport: info.off_inet_sport,
            off_skc_v6_daddr: info.off_skc_v6_daddr,
            off_skc_v6_rcv_saddr: info.off_skc_v6_rcv_saddr,
            off_skc_net: info.off_skc_net,
            off_net_inum: info.off_net_inum,
            off_tw_substate: info.off_tw_substate,
            off_sk_err: info.off_sk_err,
            off_task_tgid: info.off_task_tgid,
            debug: opts.debug_kernel as u8,
            typed_only: typed_only as u8,
            _pad2: [0; 2],
            emit_states: opts.emit_states as u8,
            _pad: [0; 7],
            wakeup_bytes: (opts.ring_size / 16) as u64,
        };
        // aya-log's own level: off unless asked (our programs test `Config.debug` first).
        let log_level: u8 = if opts.debug_kernel { 0xff } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .override_global("CONFIG", &config, true)
            .override_global(aya_log::LEVEL, &log_level, true)
            .map_max_entries("EVENTS", opts.ring_size)
            .load(OBJECT)
            .map_err(|e| {
                refused(
                    "create twtrace's maps",
                    format!(
                        "{}; a smaller --ring-size (now {}) or a higher memory limit may \
                         help (this cgroup's; before Linux 5.11, RLIMIT_MEMLOCK)",
                        one_line(&e),
                        opts.ring_size_typed
                    ),
                )
            })?;
        let programs = if opts.hooks_only {
            HOOKS_ONLY
        } else {
            PROGRAMS
        };
        let fork = opts.track_forks.then_some(FORK_PROGRAM);
        let mut links = Vec::new();
        // The kernel's type information, which BTF tracepoints are loaded against (preflight
        // has already read it once and found what it needs).
        let btf = aya::Btf::from_sys_fs().map_err(|e| refused("read BTF", e))?;
        for (prog, name) in programs.into_iter().chain(fork) {
            let place = format!("BTF tracepoint {name}");
            let program = ebpf
                .program_mut(prog)
                .ok_or_else(|| refused("load", format!("program {prog} missing from object")))?;
            let load_failed = |e: aya::programs::ProgramError| {
                let why = if opts.verbose {
                    full(&e)
                } else {
                    format!("{} (--verbose prints the verifier's log)", one_line(&e))
                };
                refused(&format!("load program {prog}"), why)
            };
            let p: &mut BtfTracePoint = program.try_into().map_err(|e| refused("load", e))?;
            #[cfg(debug_assertions)]
            if !typed_only && injected("TWTRACE_TEST_REFUSE_PROBE_READ", "1") {
                return Err(LoadError::ProbeReadRefused);
            }
            match p.load(name, &btf) {
                Ok(()) => {}
                Err(e) if !typed_only && refuses_probe_read(&e) => {
                    return Err(LoadError::ProbeReadRefused);
                }
                Err(e) => return Err(load_failed(e).into()),
            }
            injected_failure(prog, &place)?;
            let link = p
                .attach()
                .map_err(|e| refused(&format!("attach to {place}"), one_line(&e)))?;
            links.push((prog, link));
        }
        let logger = if opts.debug_kernel {
            Some(
                aya_log::EbpfLogger::init_with_logger(&mut ebpf, &KERNEL_LOG as &dyn log::Log)
                    .map_err(|e| refused("read the programs' log", e))?,
            )
        } else {
            None
        };
        #[cfg(debug_assertions)]
        if injected("TWTRACE_TEST_PANIC", "after-attach") {
            panic!("panic injected by TWTRACE_TEST_PANIC after attaching");
        }
        // Reading BTF twice (offsets, then the BTF tracepoints' types) took some 10 MB of heap,
        // freed now; hand it back to the system rather than keep it in RSS for the daemon's
        // whole life. (glibc only: musl, which the static build uses, has no malloc_trim; its
        // allocator unmaps freed groups of memory by itself.)
        drop(btf);
        // SAFETY: malloc_trim only releases free heap memory.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0)
        };
        Ok(Self {
            ebpf,
            info,
            typed_only,
            logger,
            links,
        })
    }

    /// Detaches every program: none runs after this returns (a run already under way on
    /// another CPU finishes), so nothing is emitted, lost or counted any more. The programs
    /// and maps stay loaded until the session is dropped: counters, per-program statistics
    /// and the ring buffer remain readable.
    pub fn detach(&mut self) {
        // What a program reports may need what a later program reports to be explained: a
        // cancel is a re-arm when the timer_start right after it says so, and a timer_start is
        // a birth when the state change after it takes it. So each goes before what explains
        // it: timer_cancel, then timer_start, then the rest. Detached in attach order, a re-arm
        // caught between two detaches was a cancel alone, read at the end as a kill (seen on
        // 6.1 under emulation), and starts after the state program's detach counted as births
        // never joined.
        let rank = |prog: &str| match prog {
            "timer_cancel" | "hook_timer_cancel" => 0,
            "timer_start" | "hook_timer_start" => 1,
            _ => 2,
        };
        self.links.sort_by_key(|(prog, _)| rank(prog));
        for (prog, link) in self.links.drain(..) {
            let program: Option<&mut BtfTracePoint> =
                self.ebpf.program_mut(prog).and_then(|p| p.try_into().ok());
            // A link that cannot be detached here goes with the object, when the session does.
            if let Some(p) = program {
                let _ = p.detach(link);
            }
        }
    }

    /// Prints what the programs logged since the last call (`--debug-kernel`).
    pub fn flush_log(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    pub fn take_ring(&mut self) -> Result<RingBuf<MapData>, Failure> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or_else(|| refused("create the ring buffer", "map EVENTS missing"))?;
        RingBuf::try_from(map).map_err(|e| refused("create the ring buffer", e))
    }

    /// The counters (zero where they cannot be read: see `try_counters`).
    pub fn counters(&self) -> KernelCounters {
        self.try_counters().unwrap_or_default()
    }

    /// The counters, read with bpf(BPF_MAP_LOOKUP_ELEM). Fails after serve's privilege drop on
    /// kernels before 5.19, where `kernel.unprivileged_bpf_disabled` (Debian's default: 2)
    /// refuses every bpf() command to a process without CAP_BPF or CAP_SYS_ADMIN, even on a
    /// map it holds: serve's collector process reads them then (`host::collect`).
    pub fn try_counters(&self) -> std::io::Result<KernelCounters> {
        let map = self
            .ebpf
            .map("COUNTERS")
            .ok_or_else(|| std::io::Error::other("map COUNTERS missing"))?;
        let array = PerCpuArray::<&MapData, u64>::try_from(map).map_err(std::io::Error::other)?;
        read_counters(&array)
    }

    /// A descriptor of the counters' map, for a process that reads them on this one's behalf.
    pub fn counters_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        match self.ebpf.map("COUNTERS")? {
            aya::maps::Map::PerCpuArray(data) => Some(data.fd().as_fd()),
            _ => None,
        }
    }

    /// The loaded programs' kernel statistics.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        PROGRAMS
            .iter()
            .chain(HOOKS_ONLY.iter())
            .chain([FORK_PROGRAM].iter())
            .filter_map(|(name, _)| {
                let fd = self.ebpf.program(name)?.fd().ok()?;
                let mut stats = prog_info(fd.as_fd().as_raw_fd())?;
                stats.name = name;
                Some(stats)
            })
            .collect()
    }

    /// Entries in the kernel's owner map now (sockets between connect/close and `-> CLOSE`).
    /// None when the map cannot be read: serve after its privilege drop on kernels before 5.19,
    /// where `kernel.unprivileged_bpf_disabled` refuses every bpf() command (see
    /// `try_counters`), rather than a count of 0 that would look like an empty map.
    pub fn owner_entries(&self) -> Option<usize> {
        let map = self.ebpf.map("OWNERS")?;
        let owners =
            aya::maps::HashMap::<&MapData, u64, twtrace_common::OwnerRecord>::try_from(map).ok()?;
        owners.keys().try_fold(0, |n, k| k.ok().map(|_| n + 1))
    }

    /// Puts a process in the tracked tree (its future children follow).
    pub fn track(&mut self, tgid: u32) -> Result<(), Failure> {
        let map = self
            .ebpf
            .map_mut("TRACKED")
            .ok_or_else(|| refused("track processes", "map TRACKED missing"))?;
        let mut tracked = aya::maps::HashMap::<&mut MapData, u32, u8>::try_from(map)
            .map_err(|e| refused("track processes", e))?;
        tracked
            .insert(&tgid, &1, 0)
            .map_err(|e| refused("track processes", e))
    }

    /// Whether a process belongs to the tracked tree.
    pub fn is_tracked(&self, tgid: u32) -> bool {
        self.ebpf
            .map("TRACKED")
            .and_then(|m| aya::maps::HashMap::<&MapData, u32, u8>::try_from(m).ok())
            .is_some_and(|t| t.get(&tgid, 0).is_ok())
    }

    /// Runs the kernel skipped for any twtrace program (each may have carried an event).
    pub fn recursion_misses(&self) -> u64 {
        self.program_stats()
            .iter()
            .map(|s| s.recursion_misses)
            .sum()
    }
}

/// Failure injection for the tests that prove nothing stays attached (debug builds only).
#[cfg(debug_assertions)]
fn injected(var: &str, at: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == at)
}

/// `TWTRACE_TEST_FAIL_ATTACH=<program>`: attaching that program fails (debug builds only).
fn injected_failure(prog: &str, place: &str) -> Result<(), Failure> {
    #[cfg(debug_assertions)]
    if injected("TWTRACE_TEST_FAIL_ATTACH", prog) {
        return Err(refused(
            &format!("attach to {place}"),
            "failure injected by TWTRACE_TEST_FAIL_ATTACH",
        ));
    }
    let _ = (prog, place);
    Ok(())
}

/// The per-CPU `COUNTERS` array summed per slot (twtrace_common::counter).
pub fn read_counters<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, u64>,
) -> std::io::Result<KernelCounters> {
    let sum = |slot: u32| -> std::io::Result<u64> {
        let v = array.get(&slot, 0).map_err(std::io::Error::other)?;
        Ok(v.iter().sum())
    };
    Ok(KernelCounters {
        lost: sum(counter::LOST)?,
        emitted: sum(counter::EMITTED)?,
        tw_timer_starts: sum(counter::TW_TIMER_STARTS)?,
        birth_unmatched: sum(counter::BIRTH_UNMATCHED)?,
        close_without_tw: sum(counter::CLOSE_WITHOUT_TW)?,
        owner_store_failed: sum(counter::OWNER_STORE_FAILED)?,
        track_failed: sum(counter::TRACK_FAILED)?,
        connect_failed: sum(counter::CONNECT_FAILED)?,
    })
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer; failure only matters on old kernels and shows at map creation.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// A program's kernel statistics, from `/proc/self/fdinfo` of its descriptor rather than
/// BPF_OBJ_GET_INFO_BY_FD: no bpf() call, so serve reads them after dropping every capability
/// (before Linux 6.5, `kernel.unprivileged_bpf_disabled` refuses every bpf() command to a
/// process without CAP_BPF; the fdinfo of a descriptor it holds stays readable). The kernel
/// prints `prog_id`, `run_time_ns` and `run_cnt` (5.1+) and `recursion_misses` (5.12+) there.
fn prog_info(fd: i32) -> Option<ProgramStats> {
    parse_fdinfo(&std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?)
}

fn parse_fdinfo(text: &str) -> Option<ProgramStats> {
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(ProgramStats {
        name: "",
        id: u32::try_from(field("prog_id")?).ok()?,
        run_time_ns: field("run_time_ns").unwrap_or(0),
        run_cnt: field("run_cnt").unwrap_or(0),
        recursion_misses: field("recursion_misses").unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_of_a_program() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1060\nprog_type:\t26\n\
                    prog_jited:\t1\nprog_tag:\t8a1e30e5dbd14c1c\nmemlock:\t4096\n\
                    prog_id:\t4211\nrun_time_ns:\t123456\nrun_cnt:\t789\n\
                    recursion_misses:\t2\nverified_insns:\t301\n";
        assert_eq!(
            parse_fdinfo(text),
            Some(ProgramStats {
                name: "",
                id: 4211,
                run_time_ns: 123456,
                run_cnt: 789,
                recursion_misses: 2,
            })
        );
        // 5.10 has no recursion_misses; a map's fdinfo has no prog_id.
        let old = "prog_id:\t7\nrun_time_ns:\t0\nrun_cnt:\t0\n";
        assert_eq!(parse_fdinfo(old).map(|s| s.recursion_misses), Some(0));
        assert_eq!(parse_fdinfo("map_type:\t2\nmax_entries:\t4\n"), None);
    }
}
