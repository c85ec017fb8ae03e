//! Shared by the tests of the deployment files in `deploy/`, one test file per target, each
//! checked by the tool that consumes it where this machine has one, and by structural checks of
//! our own where none exists:
//!
//! * `deploy_systemd.rs`: the systemd unit;
//! * `deploy_prometheus.rs`: the alerting rules, their unit tests and the Prometheus config;
//! * `deploy_kubernetes.rs`: the DaemonSet and its companions, and the ServiceMonitor;
//! * `deploy_docker.rs`: the Dockerfile;
//! * `deploy_readme.rs`: deploy/README.md explains every capability and every alert.
//!
//! Run them all with `cargo test -p twtrace-tests --test 'deploy_*'`.
//!
//! One capability set across all of them: the systemd, Kubernetes and Docker tests check what
//! their target grants against [`CAPS`], the README test its capability table; and the image
//! and the DaemonSet run the same [`CONTAINER_ARGV`].
//!
//! A missing tool fails the test and names the Debian package that brings it (`cargo +stable
//! xtask setup` installs them). Nothing here needs root or the network.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The capabilities `twtrace serve` needs, without the `CAP_` prefix: the one set every
/// deployment must grant, no more, no less (see deploy/README.md for why each). Its programs
/// are BTF tracepoints, attached through bpf(): no tracefs, so no DAC_READ_SEARCH.
pub const CAPS: [&str; 5] = ["BPF", "PERFMON", "SYSLOG", "SETUID", "SETGID"];

/// tracefs, which `serve` no longer reads: no deployment mounts it, depends on it or lists it.
pub const TRACEFS: [&str; 3] = [
    "/sys/kernel/tracing",
    "/sys/kernel/debug",
    "sys-kernel-tracing.mount",
];

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

pub fn deploy() -> PathBuf {
    root().join("deploy")
}

pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A command on PATH (or in the sbin directories root's PATH sometimes lacks), or a failure
/// that says which Debian package to install.
pub fn tool(cmd: &str, package: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{cmd}` is missing: install Debian's `{package}` package \
                 (`apt-get install -y {package}`; `cargo +stable xtask setup` does it)"
            )
        })
}

pub fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn combined(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn expected_caps() -> BTreeSet<String> {
    CAPS.iter().map(|c| c.to_string()).collect()
}

/// Where the unit, the image and the DaemonSet install the binary.
pub const UNIT_BINARY: &str = "/usr/local/bin/twtrace";

/// What the image and the DaemonSet run: `serve` on every address, since in a container the
/// pod's port is the only way in (the unit, on the host, stays on loopback).
pub const CONTAINER_ARGV: [&str; 4] = [UNIT_BINARY, "serve", "--listen", "0.0.0.0:9979"];

/// One alerting rule of alerts.yml, read line by line (the file is ours: one rule per
/// `- alert:` item, `expr:` on one line).
pub struct Rule {
    pub name: String,
    pub block: String,
    pub expr: String,
}

/// The alerting rules of deploy/prometheus/alerts.yml, which deploy/README.md must explain.
pub fn rules() -> Vec<Rule> {
    let text = read(&deploy().join("prometheus/alerts.yml"));
    let mut out: Vec<Rule> = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        if let Some(name) = line.trim_start().strip_prefix("- alert:") {
            out.push(Rule {
                name: name.trim().to_owned(),
                block: String::new(),
                expr: String::new(),
            });
        }
        if let Some(rule) = out.last_mut() {
            rule.block.push_str(line);
            rule.block.push('\n');
            if let Some(expr) = line.trim_start().strip_prefix("expr:") {
                rule.expr = expr.trim().to_owned();
            }
        }
    }
    out
}
