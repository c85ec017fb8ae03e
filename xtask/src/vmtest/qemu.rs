//! Booting a guest under qemu: the accelerator (KVM only when a probe shows it works), the
//! kernel command line, two serial ports (ttyS0 the kernel's console, ttyS1 the tests' output),
//! and every way a guest can fail to end by itself: a panic, a soft lockup (made a panic), a
//! guest that stops talking, the lane's time limit. qemu is killed whenever it does not end.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use super::{lanes::Lockdown, matrix::minutes};
use crate::procs::{output_for, Owned};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        match s {
            "auto" => Ok(None),
            "kvm" => Ok(Some(Accel::Kvm)),
            "tcg" => Ok(Some(Accel::Tcg)),
            _ => Err(format!("--accel takes auto, kvm or tcg, not '{s}'")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    fn args(self) -> [&'static str; 4] {
        match self {
            // `-cpu host` alone aborts qemu 7.2 under nested KVM ("failed to set MSR 0x10a"):
            // the arch-capabilities MSR is left out.
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host,-arch-capabilities"],
            // qemu's own CPU emulation, every feature it has (RDRAND among them, see cmdline).
            // One host thread for both vCPUs (thread=single): with a thread per vCPU, 6.12 died
            // once with "Oops: int3" in call_timer_fn while watch attached and detached the
            // timer tracepoints, a breakpoint of the kernel's live code patching
            // (text_poke_bp) met where it was no longer expected; suspected to be the other
            // vCPU running stale translated code. Measured: watch's tests 117 s single-threaded,
            // 108 s with a thread per vCPU (6.12, 2026-11-30).
            Accel::Tcg => ["-accel", "tcg,thread=single", "-cpu", "max"],
        }
    }
}

/// How long the probe may take: under working KVM a guest reaches userspace in about a second,
/// under TCG in about four.
const PROBE_LIMIT: Duration = Duration::from_secs(30);
const MEMORY: &str = "2G";
const CPUS: &str = "2";
/// From qemu's start to the first line of /init: a Debian cloud kernel takes about 4 s under TCG;
/// one that hangs while booting is not given the lane's whole time.
const BOOT_LIMIT: Duration = Duration::from_secs(300);
/// After a panic the kernel reboots at once (panic=-1) and qemu ends (-no-reboot); should it
/// not, it is killed this long after the panic line.
const PANIC_GRACE: Duration = Duration::from_secs(30);

/// KVM when /dev/kvm opens and a guest booted under it reaches userspace within
/// `PROBE_LIMIT`: on some nested hypervisors /dev/kvm opens but the guest prints nothing for
/// minutes, then fails with "KVM emulation failure". Otherwise TCG. The reason goes with it.
pub fn probe(kernel: &Path, initrd: &Path) -> (Accel, String) {
    if OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return (Accel::Tcg, "/dev/kvm cannot be opened".into());
    }
    let mut cmd = qemu(Accel::Kvm, kernel, initrd, "console=ttyS0 panic=-1");
    cmd.args(["-serial", "stdio"]);
    let t = Instant::now();
    match output_for(&mut cmd, PROBE_LIMIT) {
        Ok(out) if String::from_utf8_lossy(&out).contains("VMTEST-PROBE-OK") => (
            Accel::Kvm,
            format!(
                "a KVM guest reached userspace in {:.1} s",
                t.elapsed().as_secs_f64()
            ),
        ),
        Ok(_) => (
            Accel::Tcg,
            "a KVM guest ended without reaching userspace".into(),
        ),
        Err(e) if e.contains("did not finish") => (
            Accel::Tcg,
            format!(
                "a KVM guest did not reach userspace within {} s",
                PROBE_LIMIT.as_secs()
            ),
        ),
        Err(e) => (
            Accel::Tcg,
            format!("qemu failed under KVM: {}", e.lines().last().unwrap_or("")),
        ),
    }
}

/// The kernel command line of every lane.
pub fn cmdline(lockdown: Option<Lockdown>) -> String {
    let mut c = [
        "console=ttyS0",
        // Every kernel message on the console: a lockup's backtrace, a verifier's warning.
        "loglevel=7",
        // A soft lockup panics (and the panic ends qemu) instead of burning the lane's time
        // with one line every 30 s; every CPU's backtrace first.
        "softlockup_panic=1",
        "softlockup_all_cpu_backtrace=1",
        "panic=-1",
        // The entropy pool is ready at once (qemu's CPU has RDRAND): Rust's std asks getrandom
        // for its hash keys, which blocks on 5.10 until it is.
        "random.trust_cpu=on",
        // The established hash sized as on a host with more memory. Each network namespace's
        // tcp_max_tw_buckets is half its size: a 2 GB guest would get 8,192, and the overload
        // tests make more TIME_WAIT than that (TCPTimeWaitOverflow, not twtrace); this gives the
        // 131,072 of the machines the tests were written on.
        "thash_entries=262144",
    ]
    .join(" ");
    if let Some(l) = lockdown {
        c += &format!(" lockdown={}", l.name());
    }
    c
}

fn qemu(accel: Accel, kernel: &Path, initrd: &Path, append: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ])
    .args(accel.args())
    .args(["-m", MEMORY, "-smp", CPUS])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd)
    .args(["-append", append]);
    c
}

/// One guest to boot.
pub struct Spec<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub lockdown: Option<Lockdown>,
    pub accel: Accel,
    /// The serial logs, kept: ttyS0 (kernel console) and ttyS1 (tests).
    pub console_log: PathBuf,
    pub tests_log: PathBuf,
    /// The whole boot.
    pub limit: Duration,
    /// Nothing new on the tests' port for this long: the guest is stuck (its own per-executable
    /// limit would have printed something before).
    pub silence: Duration,
}

/// How a boot ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// qemu ended by itself (power-off, or the reboot after a panic).
    Exited,
    /// Killed: a panic that did not end qemu, silence, or the time limit.
    Killed(String),
}

pub struct Boot {
    pub console: String,
    pub tests: String,
    pub wall: Duration,
    pub end: End,
}

/// Boots, calling `on_line` with each complete line of the tests' port as it arrives.
pub fn boot(spec: &Spec, mut on_line: impl FnMut(&str)) -> Result<Boot, String> {
    let _ = fs::remove_file(&spec.tests_log);
    let mut cmd = qemu(
        spec.accel,
        spec.kernel,
        spec.initrd,
        &cmdline(spec.lockdown),
    );
    cmd.args(["-serial", "stdio", "-serial"])
        .arg(format!("file:{}", spec.tests_log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run qemu-system-x86_64: {e}"))?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let qemu_err = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut child = Owned(child);
    let mut console_file = File::create(&spec.console_log)
        .map_err(|e| format!("cannot write {}: {e}", spec.console_log.display()))?;
    let mut console = Vec::new();
    let mut tests = Tail::default();
    let mut last_output = Instant::now();
    let mut started = false;
    let mut panicked: Option<Instant> = None;
    let end = loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(chunk) => {
                let _ = console_file.write_all(&chunk);
                console.extend_from_slice(&chunk);
                // The new bytes, and enough before them for a line split between reads.
                let recent = &console[console.len().saturating_sub(chunk.len() + 64)..];
                if panicked.is_none() && contains(recent, b"Kernel panic - not syncing") {
                    panicked = Some(Instant::now());
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The console closed: qemu is ending (try_wait below sees it).
            Err(mpsc::RecvTimeoutError::Disconnected) => thread::sleep(Duration::from_millis(100)),
        }
        for line in tests.read(&spec.tests_log) {
            last_output = Instant::now();
            started = true;
            on_line(&line);
        }
        if let Ok(Some(_)) = child.0.try_wait() {
            // Let the console reader drain what qemu printed last.
            while let Ok(chunk) = rx.recv_timeout(Duration::from_millis(200)) {
                let _ = console_file.write_all(&chunk);
                console.extend_from_slice(&chunk);
            }
            break End::Exited;
        }
        let why = if panicked.is_some_and(|t| t.elapsed() > PANIC_GRACE) {
            Some("the kernel panicked and qemu did not end".to_owned())
        } else if !started && start.elapsed() > BOOT_LIMIT {
            Some(format!(
                "the guest did not reach /init within {}",
                minutes(BOOT_LIMIT)
            ))
        } else if start.elapsed() > spec.limit {
            Some(format!(
                "the lane's time limit ({}) passed",
                minutes(spec.limit)
            ))
        } else if last_output.elapsed() > spec.silence {
            Some(format!(
                "the guest printed nothing for {}",
                minutes(spec.silence)
            ))
        } else {
            None
        };
        if let Some(why) = why {
            let _ = child.0.kill();
            let _ = child.0.wait();
            break End::Killed(why);
        }
    };
    drop(child);
    for line in tests.read(&spec.tests_log) {
        on_line(&line);
    }
    let qemu_err = qemu_err.join().unwrap_or_default();
    let mut console = String::from_utf8_lossy(&console).replace('\r', "");
    if !qemu_err.trim().is_empty() {
        console += &format!("\nqemu: {}", qemu_err.trim());
    }
    Ok(Boot {
        console,
        tests: fs::read_to_string(&spec.tests_log)
            .unwrap_or_default()
            .replace('\r', ""),
        wall: start.elapsed(),
        end,
    })
}

/// The complete lines a growing file gained since the last read.
#[derive(Default)]
struct Tail {
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    fn read(&mut self, path: &Path) -> Vec<String> {
        let Ok(mut f) = File::open(path) else {
            return Vec::new();
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut new = Vec::new();
        let Ok(n) = f.read_to_end(&mut new) else {
            return Vec::new();
        };
        self.offset += n as u64;
        self.partial.extend_from_slice(&new);
        let mut lines = Vec::new();
        while let Some(i) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            lines.push(
                String::from_utf8_lossy(&line)
                    .trim_end_matches(['\n', '\r'])
                    .to_owned(),
            );
        }
        lines
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// What on a console says the kernel is not well, each with the lines that follow it (the
/// backtrace's start): soft lockups, RCU stalls, hung tasks, BUG, oopses, warnings, panics.
/// A line of our own `vmtest:` markers before it says which test executable was running.
pub fn kernel_problems(console: &str) -> Vec<String> {
    const SIGNS: [&str; 9] = [
        "soft lockup",
        "hard LOCKUP",
        "detected stalls on CPUs",
        "rcu_preempt kthread starved",
        "blocked for more than",
        "BUG:",
        "Oops:",
        "WARNING: CPU:",
        "Kernel panic",
    ];
    const CONTEXT: usize = 6;
    let lines: Vec<&str> = console.lines().collect();
    let mut problems = Vec::new();
    let mut running = "";
    let mut skip_until = 0;
    for (i, line) in lines.iter().enumerate() {
        if let Some(m) = line.split("vmtest: ").nth(1) {
            running = m;
        }
        if i < skip_until || !SIGNS.iter().any(|s| line.contains(s)) {
            continue;
        }
        let end = (i + 1 + CONTEXT).min(lines.len());
        let mut p = String::new();
        if !running.is_empty() {
            p += &format!("(last marker: {running})\n");
        }
        p += &lines[i..end].join("\n");
        problems.push(p);
        skip_until = end;
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_catches_lockups_and_sets_lockdown() {
        let c = cmdline(Some(Lockdown::Integrity));
        for part in [
            "console=ttyS0",
            "loglevel=7",
            "softlockup_panic=1",
            "panic=-1",
            "lockdown=integrity",
        ] {
            assert!(c.split(' ').any(|p| p == part), "{part} in {c}");
        }
        assert!(!cmdline(None).contains("lockdown"));
    }

    #[test]
    fn kernel_problems_come_with_their_context_and_the_running_test() {
        let console = "[    3.1] Run /init as init process\n\
            [   12.0] vmtest: doctor_exec begins\n\
            [   77.4] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n\
            [   77.4] rcu: \t1-...!: (0 ticks this GP)\n\
            [  104.5] watchdog: BUG: soft lockup - CPU#1 stuck for 45s! [twtrace:455]\n\
            [  104.6] Modules linked in: tcp_diag inet_diag\n";
        let p = kernel_problems(console);
        assert_eq!(p.len(), 1, "one problem, its context included: {p:?}");
        assert!(p[0].starts_with("(last marker: doctor_exec begins)\n[   77.4] rcu: INFO"));
        assert!(p[0].contains("soft lockup"));
        assert!(kernel_problems("[ 1.0] Linux version 6.1.0\n[ 2.0] ok\n").is_empty());
    }

    #[test]
    fn tail_returns_complete_lines_once() {
        let dir = std::env::temp_dir().join(format!("vmtest-tail-{}", std::process::id()));
        fs::write(&dir, "VMTEST-START 6.1\r\nVMTEST-BEG").unwrap();
        let mut t = Tail::default();
        assert_eq!(t.read(&dir), ["VMTEST-START 6.1"]);
        let mut f = OpenOptions::new().append(true).open(&dir).unwrap();
        f.write_all(b"IN watch\ntest a ... ok\n").unwrap();
        assert_eq!(t.read(&dir), ["VMTEST-BEGIN watch", "test a ... ok"]);
        assert!(t.read(&dir).is_empty());
        let _ = fs::remove_file(&dir);
    }

    #[test]
    fn accelerator_names() {
        assert_eq!(Accel::parse("auto"), Ok(None));
        assert_eq!(Accel::parse("tcg"), Ok(Some(Accel::Tcg)));
        assert!(Accel::parse("hvf").is_err());
    }
}
