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
//! their target grants against [`CAPS`], the README test its capability table (and which rows
//! are the collector's, [`COLLECTOR_CAPS`]); and the images and the DaemonSet run the same
//! [`CONTAINER_ARGV`] (the DaemonSet and `xtask dist`'s image with [`IMAGE_USER`]).
//!
//! A missing tool fails the test and names the Debian package that brings it (`cargo +stable
//! xtask setup` installs them). Nothing here needs root or the network.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

/// The capabilities `twtrace serve` needs, without the `CAP_` prefix: the one set every
/// deployment must grant, no more, no less (see deploy/README.md for why each). It starts as
/// root with all of them; its collector process keeps [`COLLECTOR_CAPS`]; serve itself then
/// drops to nobody with none. Its programs are BTF tracepoints, attached through bpf(): no
/// tracefs (DAC_READ_SEARCH is for other users' /proc/PID/fd, not for tracefs).
pub const CAPS: [&str; 8] = [
    "BPF",
    "PERFMON",
    "SYSLOG",
    "SETUID",
    "SETGID",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
];

/// The part of [`CAPS`] that the collector process (`twtrace-collector`) keeps: setns(2) into
/// each network namespace, other users' /proc/PID/ns/net and /proc/PID/fd. The same set as
/// `twtrace::host::collect::COLLECTOR_CAPS` (by number there; `deploy_systemd.rs` compares the
/// two through systemd's table of capability numbers).
pub const COLLECTOR_CAPS: [&str; 3] = ["SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"];

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

/// What the images and the DaemonSet run: `serve` on every address, since in a container the
/// pod's port is the only way in (the unit, on the host, stays on loopback).
pub const CONTAINER_ARGV: [&str; 4] = [UNIT_BINARY, "serve", "--listen", "0.0.0.0:9979"];

/// What the image `xtask dist` builds and the DaemonSet add to [`CONTAINER_ARGV`]: that image
/// has no /etc/passwd, so `nobody` goes by its number (the Dockerfile's Debian image, which has
/// one, needs nothing added; its nobody is 65534 too).
pub const IMAGE_USER: [&str; 2] = ["--user", "65534"];

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

/// docs/metrics.md: metric name -> its labels. Histograms also have _bucket (with `le`),
/// _sum and _count.
pub fn documented_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let doc = read(&root().join("docs/metrics.md"));
    let mut out = BTreeMap::new();
    for line in doc.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `name` | type | labels | meaning |
        if cells.len() < 5 {
            continue;
        }
        let Some(name) = cells[1]
            .strip_prefix('`')
            .and_then(|c| c.strip_suffix('`'))
            .filter(|n| n.starts_with("twtrace_"))
        else {
            continue;
        };
        let labels: BTreeSet<String> = cells[3]
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        if cells[2] == "histogram" {
            let mut bucket = labels.clone();
            bucket.insert("le".into());
            out.insert(format!("{name}_bucket"), bucket);
            out.insert(format!("{name}_sum"), labels.clone());
            out.insert(format!("{name}_count"), labels.clone());
        }
        out.insert(name.to_owned(), labels);
    }
    assert!(
        out.len() >= 10,
        "docs/metrics.md: the metrics table did not parse ({} metrics)",
        out.len()
    );
    out
}

pub fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `twtrace_*` names in a text, each with the label names of a `{...}` right behind it.
pub fn metric_uses(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("twtrace_") {
        let before = rest[..i].chars().next_back();
        let tail = &rest[i..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        let name = &tail[..end];
        rest = &tail[end..];
        if before.is_some_and(is_ident) {
            continue;
        }
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let close = inner.find('}').expect("unclosed {");
            for matcher in inner[..close].split(',') {
                let label: String = matcher
                    .trim()
                    .chars()
                    .take_while(|c| is_ident(*c))
                    .collect();
                if !label.is_empty() {
                    labels.push(label);
                }
            }
        }
        out.push((name.to_owned(), labels));
    }
    out
}

/// deploy/grafana/twtrace.json.
pub fn dashboard() -> serde_json::Value {
    let path = deploy().join("grafana/twtrace.json");
    serde_json::from_str(&read(&path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every panel of the dashboard, rows and the panels of collapsed rows included, in order.
pub fn dashboard_panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// Every query of the dashboard: (where, PromQL) for each panel target, in panel order.
pub fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    dashboard_panels(dashboard)
        .into_iter()
        .flat_map(|p| {
            p["targets"].as_array().into_iter().flatten().map(move |t| {
                let title = p["title"].as_str().unwrap_or("?");
                let place = format!("panel \"{title}\" {}", t["refId"].as_str().unwrap_or("?"));
                (place, t["expr"].as_str().unwrap_or_default().to_owned())
            })
        })
        .collect()
}

/// The dashboard's query variables: (name, `label_values(SELECTOR, LABEL)` query).
pub fn dashboard_variables(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().expect("name").to_owned();
            let query = v["query"]["query"].as_str().or(v["query"].as_str());
            (name, query.expect("a query").to_owned())
        })
        .collect()
}

/// `label_values(SELECTOR, LABEL)` -> (SELECTOR, LABEL).
pub fn label_values(query: &str) -> (String, String) {
    let inner = query
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not label_values(...): {query}"));
    let (selector, label) = inner
        .rsplit_once(',')
        .expect("label_values(selector, label)");
    (selector.trim().to_owned(), label.trim().to_owned())
}
