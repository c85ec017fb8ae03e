//! The guest's root file system: one cpio archive (the kernel's `newc` format, written here, so
//! that no root and no staging tree are needed) with busybox, twtrace, the integration test
//! executables, `twt-churn`, the commands the tests run with their shared libraries, the
//! `/init` that runs them, and the kernel's own modules. The part common to every kernel is
//! built once; each kernel gets it followed by a second archive with its modules (the kernel
//! unpacks concatenated archives in order).

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::{
    kernels::{create_dir, Kernel},
    suite::{Build, Plan},
};
use crate::{procs::run_for, setup::which};

/// The guest's `/init` (a shell script, run by the host's /bin/sh).
const INIT: &str = include_str!("guest-init.sh");

/// Where the project's binaries sit in the guest. The tests find `twtrace` and `twt-churn` next
/// to the directory of their own executable (`target/<profile>/deps/<test>`), so the guest
/// keeps that shape (guest-init.sh runs the tests from its `deps/`).
pub const GUEST_BUILD: &str = "opt/twtrace/build";

/// Commands the integration tests run, taken from the host with their shared libraries (busybox
/// provides cat, mount, umount, seq, kill, sleep, insmod, timeout and poweroff; these need
/// options or behaviour busybox lacks).
const TOOLS: [(&str, &str); 10] = [
    // Debian's busybox is built to run its own applets before anything on PATH, so under its sh
    // every `sh -c` of the tests would get busybox's setpriv, which lacks --bounding-set. The
    // host's /bin/sh (dash on Debian and Ubuntu) is /bin/sh in the guest too.
    ("sh", "the tests' `sh -c`, and /init"),
    ("ip", "network namespaces (ip netns), veth pairs, addresses"),
    ("ss", "TIME_WAIT 4-tuples through sock_diag, ss -K"),
    ("bpftool", "which programs are loaded"),
    (
        "setpriv",
        "running twtrace without privileges or capabilities",
    ),
    ("unshare", "a mount namespace without tracefs"),
    ("bash", "refused connects through /dev/tcp"),
    ("tmux", "a real terminal for `twtrace top`"),
    ("pgrep", "finding top's pid inside tmux"),
    ("sysctl", "per-namespace settings (sysctl -qw)"),
];

/// Terminal descriptions tmux may look up, where Debian and Ubuntu keep them.
const TERMINFO: [&str; 7] = [
    "l/linux",
    "s/screen",
    "s/screen-256color",
    "t/tmux",
    "t/tmux-256color",
    "v/vt100",
    "d/dumb",
];
const TERMINFO_DIRS: [&str; 3] = ["/etc/terminfo", "/lib/terminfo", "/usr/share/terminfo"];
/// tmux refuses to start without a UTF-8 locale; glibc's C.UTF-8 is a directory of files.
const LOCALE: &str = "/usr/lib/locale/C.utf8";

/// tzdata, and the zones the tests name in `TZ` (cli_ux's local time: +05:45 all year).
const ZONEINFO: &str = "/usr/share/zoneinfo";
const ZONES: [&str; 1] = ["Asia/Kathmandu"];

const LIMIT: Duration = Duration::from_secs(120);

/// The archive every kernel shares: everything but the kernel's own files. The plan's test
/// executables are in it, and the plan as `/vmtest/plan` (see guest-init.sh).
pub fn base(build: &Build, plan: &Plan, work: &Path) -> Result<Vec<u8>, String> {
    let mut a = Archive::default();
    for d in [
        "proc", "sys", "dev", "tmp", "run", "root", "sbin", "usr/bin", "usr/sbin",
    ] {
        a.dir(d);
    }
    busybox(&mut a)?;
    a.file("init", 0o755, INIT.as_bytes());
    a.file("vmtest/plan", 0o644, plan.guest_file().as_bytes());
    a.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    );
    a.file("etc/group", 0o644, b"root:x:0:\nnogroup:x:65534:\n");
    // Without it glibc would also try NIS and DNS for `serve`'s lookup of the user nobody.
    a.file("etc/nsswitch.conf", 0o644, b"passwd: files\ngroup: files\n");

    let mut elves: Vec<PathBuf> = Vec::new();
    for (cmd, _why) in TOOLS {
        let host = tool(cmd)?;
        a.file(&guest_path(&host), 0o755, &read(&host)?);
        if cmd == "sh" {
            a.symlink("bin/sh", &host.to_string_lossy());
        }
        elves.push(host);
    }
    for name in TERMINFO {
        if let Some(p) = TERMINFO_DIRS
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
        {
            a.file(&guest_path(&p), 0o644, &read(&p)?);
        }
    }
    if Path::new(LOCALE).is_dir() {
        a.tree(Path::new(LOCALE))?;
    }
    // The time zones tests set in `TZ` (the guest has no /etc/localtime: UTC otherwise).
    for zone in ZONES {
        let p = Path::new(ZONEINFO).join(zone);
        if p.is_file() {
            a.file(&guest_path(&p), 0o644, &read(&p)?);
        }
    }

    // twtrace as it ships, byte for byte (static: no library).
    a.file(
        &format!("{GUEST_BUILD}/twtrace"),
        0o755,
        &read(&build.twtrace)?,
    );
    elves.push(build.twtrace.clone());
    // The tests and their traffic generator, without their debug info (it is most of their
    // size; the symbol table stays, for backtraces).
    let stripped = work.join("stripped");
    create_dir(&stripped)?;
    let mut ours: Vec<(PathBuf, String)> =
        vec![(build.churn.clone(), format!("{GUEST_BUILD}/twt-churn"))];
    for t in build
        .tests
        .iter()
        .filter(|t| plan.runs.iter().any(|(exe, _)| *exe == t.name))
    {
        ours.push((t.exe.clone(), format!("{GUEST_BUILD}/deps/{}", t.name)));
    }
    for (host, guest) in ours {
        let out = stripped.join(host.file_name().unwrap_or_default());
        run_for(
            Command::new("strip")
                .arg("--strip-debug")
                .arg("-o")
                .arg(&out)
                .arg(&host),
            LIMIT,
        )?;
        a.file(&guest, 0o755, &read(&out)?);
        elves.push(host);
    }

    let mut libs = BTreeSet::new();
    for elf in &elves {
        libs.extend(libraries(elf)?);
    }
    for lib in libs {
        a.file(&guest_path(&lib), 0o755, &read(&lib)?);
    }
    Ok(a.finish())
}

/// What one kernel adds to the base, as the archive that follows it: its modules
/// (`/vmtest/modules` lists them in load order, the files are in /lib/modules/vmtest/) and its
/// /boot/config, which a Debian host has too.
pub fn kernel_part(kernel: &Kernel) -> Result<Vec<u8>, String> {
    let mut a = Archive::default();
    a.file(
        &format!("boot/config-{}", kernel.release),
        0o644,
        &read(&kernel.config)?,
    );
    let mut list = String::new();
    for (name, path) in &kernel.modules {
        a.file(
            &format!("lib/modules/vmtest/{name}.ko"),
            0o644,
            &read(path)?,
        );
        list += &format!("{name}\n");
    }
    a.file("vmtest/modules", 0o644, list.as_bytes());
    Ok(a.finish())
}

/// A guest that only says it reached userspace: the accelerator probe.
pub fn probe() -> Result<Vec<u8>, String> {
    let mut a = Archive::default();
    busybox(&mut a)?;
    a.file(
        "init",
        0o755,
        b"#!/bin/busybox sh\n/bin/busybox echo VMTEST-PROBE-OK\n/bin/busybox poweroff -f\n",
    );
    Ok(a.finish())
}

/// busybox at /bin/busybox (the init links its applets). /bin/sh is the host's: the kernel runs
/// /init through its `#!/bin/sh`, and without /bin/sh it says `Failed to execute /init (error
/// -2)`, which reads as if /init were missing.
fn busybox(a: &mut Archive) -> Result<(), String> {
    let host = which("busybox")
        .ok_or("busybox is missing: install busybox-static (cargo +stable xtask setup does)")?;
    a.file("bin/busybox", 0o755, &read(&host)?);
    for lib in libraries(&host)? {
        a.file(&guest_path(&lib), 0o755, &read(&lib)?);
    }
    Ok(())
}

/// The host's executable for `cmd`, symlinks resolved. Ubuntu's /usr/sbin/bpftool is a shell
/// script that runs the bpftool of the running kernel's linux-tools: take a real one from there.
fn tool(cmd: &str) -> Result<PathBuf, String> {
    let missing = || format!("{cmd} is missing: cargo +stable xtask setup installs it");
    let found = which(cmd).ok_or_else(missing)?;
    let path = fs::canonicalize(&found).map_err(|e| format!("{}: {e}", found.display()))?;
    if read(&path)?.starts_with(b"#!") {
        let mut real: Vec<PathBuf> = fs::read_dir("/usr/lib/linux-tools")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join(cmd))
            .filter(|p| p.is_file())
            .collect();
        real.sort();
        return real.pop().ok_or_else(|| {
            format!(
                "{} is a script, and no /usr/lib/linux-tools/*/{cmd} exists to put in the guest",
                path.display()
            )
        });
    }
    Ok(path)
}

/// The shared libraries an executable loads (its interpreter included), from `ldd`.
fn libraries(elf: &Path) -> Result<Vec<PathBuf>, String> {
    // ldd exits 1 for a static executable, saying so.
    let out = match run_for(Command::new("ldd").arg(elf), LIMIT) {
        Ok(out) => out,
        Err(e) if e.contains("not a dynamic executable") => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    parse_ldd(&out).map_err(|e| format!("{}: {e}", elf.display()))
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)`, `/lib64/ld-linux-x86-64.so.2
/// (0x...)`, `linux-vdso.so.1 (0x...)` (in the kernel, no file): the absolute paths.
fn parse_ldd(out: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        if line.contains("not found") {
            return Err(format!("a library is missing on this machine: {line}"));
        }
        let target = line.split_once("=>").map_or(line, |(_, t)| t).trim();
        if let Some(path) = target
            .split_whitespace()
            .next()
            .filter(|p| p.starts_with('/'))
        {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// A host path as an archive path (no leading slash).
fn guest_path(p: &Path) -> String {
    p.to_string_lossy().trim_start_matches('/').to_owned()
}

fn read(p: &Path) -> Result<Vec<u8>, String> {
    fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

/// A cpio archive in the `newc` format the kernel unpacks: for each entry a 110-byte header of
/// hex fields, the NUL-terminated name, the data, each padded to 4 bytes; `TRAILER!!!` last.
/// Parent directories are added before their first entry; every entry is owned by root.
#[derive(Default)]
pub struct Archive {
    data: Vec<u8>,
    dirs: BTreeSet<String>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

impl Archive {
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.dirs.insert(path.to_owned());
        self.entry(path, S_IFDIR | 0o755, b"");
    }

    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.parent(path);
        self.entry(path, S_IFREG | perm, data);
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.entry(path, S_IFLNK | 0o777, target.as_bytes());
    }

    /// A host directory, recursively, at the same path.
    fn tree(&mut self, dir: &Path) -> Result<(), String> {
        let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                self.tree(&p)?;
            } else {
                self.file(&guest_path(&p), 0o644, &read(&p)?);
            }
        }
        Ok(())
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.ino = 0;
        self.header("TRAILER!!!", 0, 0);
        self.data
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = path.trim_matches('/').rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        self.header(path, mode, data.len());
        self.data.extend_from_slice(data);
        self.pad();
    }

    fn header(&mut self, name: &str, mode: u32, size: usize) {
        let fields: [u32; 13] = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            size as u32,
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            name.len() as u32 + 1,
            0, // check
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
    }

    fn pad(&mut self) {
        while self.data.len() % 4 != 0 {
            self.data.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, data) of each entry, read back the way the kernel does.
    fn entries(mut b: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0;
        loop {
            assert_eq!(&b[..6], b"070701", "at {offset}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap() as usize
            };
            let (mode, size, namesize) = (field(1), field(6), field(11));
            let name = std::str::from_utf8(&b[110..110 + namesize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_at = (110 + namesize).next_multiple_of(4);
            let end = (data_at + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(end, b.len(), "nothing after the trailer");
                return out;
            }
            out.push((name, mode as u32, b[data_at..data_at + size].to_vec()));
            offset += end;
            b = &b[end..];
        }
    }

    #[test]
    fn newc_entries_with_parents_first_and_a_trailer() {
        let mut a = Archive::default();
        a.dir("tmp");
        a.file("usr/bin/tool", 0o755, b"hello");
        a.symlink("bin/sh", "busybox");
        a.file("usr/bin/other", 0o644, b"");
        let e = entries(&a.finish());
        let names: Vec<&str> = e.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "tmp",
                "usr",
                "usr/bin",
                "usr/bin/tool",
                "bin",
                "bin/sh",
                "usr/bin/other"
            ]
        );
        assert_eq!(e[3].1, 0o100755);
        assert_eq!(e[3].2, b"hello");
        assert_eq!(e[5].1, 0o120777);
        assert_eq!(e[5].2, b"busybox");
        assert_eq!(e[0].1, 0o040755);
    }

    #[test]
    fn ldd_output_gives_the_files_to_copy() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd8f1f5000)\n\
                   \tlibelf.so.1 => /lib/x86_64-linux-gnu/libelf.so.1 (0x00007f0b1c000000)\n\
                   \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0b1be00000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f0b1c2a0000)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libelf.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n")
            .unwrap_err()
            .contains("libfoo"));
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }
}
