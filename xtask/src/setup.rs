//! Installs what is missing, and only that: one line for each step it takes, nothing for what is
//! already there. Where it cannot install (not root, not Debian/Ubuntu) it prints the exact
//! command to run and stops.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use crate::{status, TOOLCHAIN};

/// What the caller is about to do.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Build twtrace (toolchain, LLVM 22, bpf-linker).
    Build,
    /// Also run it (nothing more: twtrace's programs are BTF tracepoints and need no tracefs).
    Run,
    /// Build what ships (`dist`): the musl target, dpkg-deb, buildah.
    Dist,
    /// Everything the tests and the benchmark need: Run and Dist, the tools the tests drive (ip,
    /// ss, bpftool, ..., lintian, mmdebstrap, podman), a clean Debian root for the .deb test,
    /// and tracefs for the benchmark's classic peers (bpftrace, libbpf-tools' tcpstates).
    Test,
    /// Build it and test it in virtual machines (qemu, busybox, the guest's tools); nothing is
    /// loaded into this machine's kernel.
    VmTest,
    /// Everything above (`xtask setup`).
    All,
}

impl Need {
    fn tests_here(self) -> bool {
        matches!(self, Need::Test | Need::All)
    }

    fn tests_in_vms(self) -> bool {
        matches!(self, Need::VmTest | Need::All)
    }

    fn dists(self) -> bool {
        matches!(self, Need::Dist | Need::Test | Need::All)
    }
}

const COMPONENTS: [&str; 3] = ["rust-src", "clippy", "rustfmt"];
const BPF_LINKER: &str = "0.13.0";
const LLVM: &str = "22";

/// Debian packages the tests drive, by the command that shows they are there.
const TEST_TOOLS: [(&str, &str); 7] = [
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("bpftool", "bpftool"),
    ("setpriv", "util-linux"),
    ("tmux", "tmux"),
    ("promtool", "prometheus"),
    ("systemd-analyze", "systemd"),
];

/// Debian packages the tests use that bring no command (Python modules, the keyring
/// mmdebstrap checks Debian's archive with), checked with dpkg.
const TEST_PACKAGES: [&str; 3] = [
    "python3-yaml",
    "python3-kubernetes",
    "debian-archive-keyring",
];

/// What `dist` runs besides cargo (tar, gzip, sha256sum and md5sum are essential packages).
const DIST_TOOLS: [(&str, &str); 2] = [("dpkg-deb", "dpkg"), ("buildah", "buildah")];

/// What the install tests drive: Debian's package checker, the tool that makes the clean
/// Debian root the .deb is installed into, and the container engine that runs the image (with
/// runc, for hosts whose cgroups are in hybrid mode, which podman's default crun refuses).
const INSTALL_TEST_TOOLS: [(&str, &str); 4] = [
    ("lintian", "lintian"),
    ("mmdebstrap", "mmdebstrap"),
    ("podman", "podman"),
    ("runc", "runc"),
];

/// The Debian release of the clean root the .deb test installs into, and where it comes from
/// (given explicitly: on Ubuntu mmdebstrap would otherwise use the host's archive).
const DEBIAN_SUITE: &str = "bookworm";
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";

/// The clean Debian root (a tarball made by mmdebstrap once, then reused: the test unpacks a
/// fresh copy each run). `xtask test` passes it to the tests as `TWTRACE_DEBIAN_ROOT`.
pub fn debian_root() -> PathBuf {
    crate::root().join(format!(
        "target/dist-cache/debian-{DEBIAN_SUITE}-minbase.tar"
    ))
}

/// What `vm-test` runs on this machine, and the tools it copies into each guest (see
/// xtask/src/vmtest/initramfs.rs), by the file that shows they are there.
const VM_TOOLS: [(&str, &str); 15] = [
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
    ("dpkg-deb", "dpkg"),
    ("strip", "binutils"),
    ("ip", "iproute2"),
    ("ss", "iproute2"),
    ("bpftool", "bpftool"),
    ("setpriv", "util-linux"),
    ("unshare", "util-linux"),
    ("bash", "bash"),
    ("tmux", "tmux"),
    ("pgrep", "procps"),
    ("sysctl", "procps"),
];
/// The Debian archive's signing keys, for the guests' kernels (Ubuntu does not have them).
const DEBIAN_KEYRING: (&str, &str) = (
    "/usr/share/keyrings/debian-archive-keyring.gpg",
    "debian-archive-keyring",
);

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

pub fn which(cmd: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    // Root's PATH on some systems lacks the sbin directories where ip and bpftool live.
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(cmd)).find(|p| p.is_file())
}

pub(crate) fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

pub(crate) fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn step(what: &str) {
    println!("setup: {what}");
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

pub fn ensure(need: Need) -> Result<(), String> {
    let mut apt = Apt::default();
    toolchain()?;
    if !bpf_linker_ok() {
        if !Path::new(&format!("/usr/lib/llvm-{LLVM}/bin/llvm-config")).exists() {
            apt.want(&format!("llvm-{LLVM}-dev"));
            apt.install("LLVM 22 to build bpf-linker")?;
        }
        install_bpf_linker()?;
    }
    if need.dists() {
        musl_target()?;
        for (cmd, pkg) in DIST_TOOLS {
            if which(cmd).is_none() {
                apt.want(pkg);
            }
        }
        apt.install("the tools dist runs")?;
    }
    if need.tests_here() {
        for (cmd, pkg) in TEST_TOOLS.iter().chain(&INSTALL_TEST_TOOLS) {
            if which(cmd).is_none() {
                apt.want(pkg);
            }
        }
        if which("dpkg-query").is_some() {
            for pkg in TEST_PACKAGES {
                if !dpkg_installed(pkg) {
                    apt.want(pkg);
                }
            }
        }
        apt.install("the tools the tests drive")?;
        debian_root_tarball()?;
    }
    if need.tests_in_vms() {
        for (cmd, pkg) in VM_TOOLS {
            if which(cmd).is_none() {
                apt.want(pkg);
            }
        }
        if !Path::new(DEBIAN_KEYRING.0).exists() {
            apt.want(DEBIAN_KEYRING.1);
        }
        apt.install("the virtual machines of vm-test")?;
    }
    if need.tests_here() {
        tracefs()?;
    }
    Ok(())
}

/// The standard library for the static build's target (`dist::TARGET`).
fn musl_target() -> Result<(), String> {
    let target = crate::dist::TARGET;
    let installed = output(Command::new("rustup").args([
        "target",
        "list",
        "--installed",
        "--toolchain",
        TOOLCHAIN,
    ]))
    .unwrap_or_default();
    if installed.lines().any(|l| l.trim() == target) {
        return Ok(());
    }
    step(&format!(
        "adding the {target} target to Rust {TOOLCHAIN} (rustup) for the static build"
    ));
    status(Command::new("rustup").args(["target", "add", "--toolchain", TOOLCHAIN, target]))
}

/// The clean Debian root of the .deb test, made once (about a minute and a half).
fn debian_root_tarball() -> Result<(), String> {
    let tarball = debian_root();
    if tarball.exists() {
        return Ok(());
    }
    if !is_root() {
        return Err(
            "the .deb test's Debian root is made as root: run `sudo -E cargo +stable \
                    xtask setup`"
                .into(),
        );
    }
    step(&format!(
        "making a clean Debian {DEBIAN_SUITE} root for the .deb test (mmdebstrap, kept in {})",
        tarball.display()
    ));
    let dir = tarball.parent().expect("under target");
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    // Written under another name first: an interrupted run leaves no truncated root behind.
    let partial = tarball.with_extension("partial.tar");
    status(
        Command::new("mmdebstrap")
            .args([
                "--quiet",
                "--mode=root",
                "--variant=minbase",
                "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
                DEBIAN_SUITE,
            ])
            .arg(&partial)
            .arg(DEBIAN_MIRROR),
    )?;
    std::fs::rename(&partial, &tarball)
        .map_err(|e| format!("cannot rename {}: {e}", partial.display()))
}

fn toolchain() -> Result<(), String> {
    if which("rustup").is_none() && !cargo_bin_dir().join("rustup").exists() {
        return Err(
            "rustup is missing: install it with `curl --proto '=https' --tlsv1.2 -sSf \
             https://sh.rustup.rs | sh`, then run this again"
                .into(),
        );
    }
    let installed = output(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    let have = installed
        .lines()
        .any(|l| l.starts_with(&format!("{TOOLCHAIN}-")));
    let missing: Vec<&str> = if have {
        let comps = output(Command::new("rustup").args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            TOOLCHAIN,
        ]))
        .unwrap_or_default();
        COMPONENTS
            .iter()
            .copied()
            .filter(|c| {
                !comps
                    .lines()
                    .any(|l| l.starts_with(&format!("{c}-")) || l == *c)
            })
            .collect()
    } else {
        COMPONENTS.to_vec()
    };
    if have && missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "installing Rust {TOOLCHAIN} with {} (rustup)",
        missing.join(", ")
    ));
    status(Command::new("rustup").args([
        "toolchain",
        "install",
        TOOLCHAIN,
        "--profile",
        "minimal",
        "--component",
        &missing.join(","),
    ]))
}

/// bpf-linker of the pinned version, linked against LLVM 22 (the LLVM of Rust 1.98).
fn bpf_linker_ok() -> bool {
    let Some(path) = which("bpf-linker").or_else(|| {
        let p = cargo_bin_dir().join("bpf-linker");
        p.exists().then_some(p)
    }) else {
        return false;
    };
    let version = output(Command::new(&path).arg("--version")).unwrap_or_default();
    if !version.contains(BPF_LINKER) {
        return false;
    }
    // A dynamically linked bpf-linker names its LLVM; a static one is trusted by version.
    match output(Command::new("ldd").arg(&path)) {
        Some(libs) if libs.contains("libLLVM") => {
            libs.contains(&format!("libLLVM.so.{LLVM}")) && !libs.contains("not found")
        }
        _ => true,
    }
}

fn install_bpf_linker() -> Result<(), String> {
    step(&format!(
        "installing bpf-linker {BPF_LINKER} against LLVM {LLVM} (cargo install, about a minute)"
    ));
    let llvm_bin = format!("/usr/lib/llvm-{LLVM}/bin");
    let path = env::var("PATH").unwrap_or_default();
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{TOOLCHAIN}"))
        .args([
            "install",
            "--locked",
            "--force",
            &format!("bpf-linker@{BPF_LINKER}"),
            "--no-default-features",
            "--features",
            &format!("llvm-{LLVM}"),
        ])
        // Without LLVM 22 first in PATH its build finds another llvm-config and fails to link.
        .env("PATH", format!("{llvm_bin}:{path}"));
    crate::clean_env(&mut cmd);
    cmd.env_remove("CARGO_TARGET_DIR");
    status(&mut cmd)
}

fn tracefs() -> Result<(), String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("tracefs"))
    {
        return Ok(());
    }
    if !is_root() {
        return Err(
            "tracefs is not mounted: run `sudo mount -t tracefs nodev /sys/kernel/tracing`".into(),
        );
    }
    step("mounting tracefs at /sys/kernel/tracing");
    status(Command::new("mount").args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"]))
}

/// Debian packages to install in one go.
#[derive(Default)]
struct Apt {
    packages: Vec<String>,
    updated: bool,
}

impl Apt {
    fn want(&mut self, pkg: &str) {
        if !self.packages.iter().any(|p| p == pkg) {
            self.packages.push(pkg.to_owned());
        }
    }

    fn install(&mut self, why: &str) -> Result<(), String> {
        if self.packages.is_empty() {
            return Ok(());
        }
        let list = self.packages.join(" ");
        if which("apt-get").is_none() {
            return Err(format!(
                "{why} are missing ({list}) and this is not Debian or Ubuntu: install the \
                 equivalent packages, then run this again"
            ));
        }
        if !is_root() {
            return Err(format!(
                "{why} are missing: run `sudo apt-get install -y {list}`, then run this again"
            ));
        }
        step(&format!("installing {list} (apt-get) for {why}"));
        if !self.updated {
            status(
                Command::new("apt-get")
                    .args(["update", "-qq"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            self.updated = true;
        }
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&self.packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
        if self.packages.iter().any(|p| p == "prometheus") {
            // Debian starts the packaged servers at once; the tests start their own.
            let _ = Command::new("systemctl")
                .args(["disable", "--now", "prometheus", "prometheus-node-exporter"])
                .output();
        }
        self.packages.clear();
        Ok(())
    }
}
