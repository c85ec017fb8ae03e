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
    /// Also run it (tracefs mounted).
    Run,
    /// Also test it (ip, ss, bpftool, setpriv, tmux).
    Test,
    /// Build it and test it in virtual machines (qemu, busybox, the guest's tools); nothing is
    /// loaded into this machine's kernel, so tracefs is left alone.
    VmTest,
    /// Everything above (`xtask setup`).
    All,
}

impl Need {
    fn runs_here(self) -> bool {
        matches!(self, Need::Run | Need::Test | Need::All)
    }

    fn tests_here(self) -> bool {
        matches!(self, Need::Test | Need::All)
    }

    fn tests_in_vms(self) -> bool {
        matches!(self, Need::VmTest | Need::All)
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

/// Debian packages the tests use that bring no command (Python modules), checked with dpkg.
const TEST_PACKAGES: [&str; 2] = ["python3-yaml", "python3-kubernetes"];

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
    if need.tests_here() {
        for (cmd, pkg) in TEST_TOOLS {
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
    if need.runs_here() {
        tracefs()?;
    }
    Ok(())
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
