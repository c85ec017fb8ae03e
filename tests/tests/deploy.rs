//! The deployment files in `deploy/`, each checked by the tool that consumes it where this
//! machine has one, and by structural checks of our own where none exists:
//!
//! * systemd unit: `systemd-analyze verify` (no complaint but the missing binary) and
//!   `systemd-analyze security --offline=yes` (exposure printed, and bounded);
//! * Prometheus: `promtool check rules`, `promtool check config`, `promtool test rules`, and
//!   every metric and label the rules use exists in docs/metrics.md;
//! * Kubernetes: parsed by PyYAML (duplicate keys refused) and every field checked against the
//!   Kubernetes API models of Debian's python3-kubernetes (no cluster needed: kubectl's
//!   validation needs an API server, kubeconform is not packaged); the ServiceMonitor (a CRD,
//!   not in those models) against its documented fields;
//! * Dockerfile: no Docker engine here, so a parser of our own (instructions, stages,
//!   entrypoint) and its HEALTHCHECK command run against a real HTTP server;
//! * one capability set across all of them.
//!
//! A missing tool fails the test and names the Debian package that brings it (`cargo +stable
//! xtask setup` installs them). Nothing here needs root or the network.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
};

use serde_json::Value;

/// The capabilities `twtrace serve` needs, without the `CAP_` prefix: the one set every
/// deployment must grant, no more, no less (see deploy/README.md for why each). Its programs
/// are BTF tracepoints, attached through bpf(): no tracefs, so no DAC_READ_SEARCH.
const CAPS: [&str; 5] = ["BPF", "PERFMON", "SYSLOG", "SETUID", "SETGID"];

/// tracefs, which `serve` no longer reads: no deployment mounts it, depends on it or lists it.
const TRACEFS: [&str; 3] = [
    "/sys/kernel/tracing",
    "/sys/kernel/debug",
    "sys-kernel-tracing.mount",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn deploy() -> PathBuf {
    root().join("deploy")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A command on PATH (or in the sbin directories root's PATH sometimes lacks), or a failure
/// that says which Debian package to install.
fn tool(cmd: &str, package: &str) -> PathBuf {
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

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn combined(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A directory of this test's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("twtrace-deploy-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn expected_caps() -> BTreeSet<String> {
    CAPS.iter().map(|c| c.to_string()).collect()
}

// =============================================================================================
// systemd

/// `[Section] key=value` pairs of a unit file, in order (keys repeat).
fn unit_entries(unit: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in unit.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_owned();
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("unit line without '=': {line}"));
        out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    out
}

fn unit_value<'a>(entries: &'a [(String, String, String)], key: &str) -> Vec<&'a str> {
    entries
        .iter()
        .filter(|(_, k, _)| k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

const UNIT_BINARY: &str = "/usr/local/bin/twtrace";

/// What the image and the DaemonSet run: `serve` on every address, since in a container the
/// pod's port is the only way in (the unit, on the host, stays on loopback).
const CONTAINER_ARGV: [&str; 4] = [UNIT_BINARY, "serve", "--listen", "0.0.0.0:9979"];

/// systemd's own parser accepts the unit: `systemd-analyze verify` says nothing at all, except
/// that the binary is not installed (it is not, on a build machine). The same unit with the
/// binary replaced by /bin/true must then verify with no output and exit 0, so that the one
/// tolerated message cannot hide another failure.
#[test]
fn systemd_unit_verifies() {
    let analyze = tool("systemd-analyze", "systemd");
    let unit = deploy().join("systemd/twtrace.service");
    let content = read(&unit);

    let out = output(Command::new(&analyze).arg("verify").arg(&unit));
    let missing_binary = format!(
        "twtrace.service: Command {UNIT_BINARY} is not executable: No such file or directory"
    );
    let all = combined(&out);
    let unexpected: Vec<&str> = all
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(l.trim() == missing_binary && !Path::new(UNIT_BINARY).exists()))
        .collect();
    assert!(
        unexpected.is_empty(),
        "systemd-analyze verify {}:\n{}",
        unit.display(),
        unexpected.join("\n")
    );

    // The same unit, runnable.
    let dir = TempDir::new("unit");
    let exec = format!("ExecStart={UNIT_BINARY} ");
    assert_eq!(
        content.matches(&exec).count(),
        1,
        "the unit must start {UNIT_BINARY} exactly once"
    );
    let copy = dir.0.join("twtrace.service");
    fs::write(&copy, content.replace(&exec, "ExecStart=/bin/true ")).unwrap();
    let out = output(Command::new(&analyze).arg("verify").arg(&copy));
    assert!(
        out.status.success() && combined(&out).trim().is_empty(),
        "systemd-analyze verify of the unit with ExecStart=/bin/true ({}): {}",
        out.status,
        combined(&out)
    );
}

/// The hardening the unit promises, read back from the file, and systemd's own capability
/// names for it (systemd-analyze verify does not complain about an unknown capability).
#[test]
fn systemd_unit_grants_exactly_the_needed_capabilities() {
    let analyze = tool("systemd-analyze", "systemd");
    let entries = unit_entries(&read(&deploy().join("systemd/twtrace.service")));

    assert_eq!(
        unit_value(&entries, "ExecStart"),
        [format!("{UNIT_BINARY} serve --listen 127.0.0.1:9979").as_str()]
    );
    // Root at start (no User=): twtrace drops to nobody itself after loading.
    assert!(
        unit_value(&entries, "User").is_empty(),
        "no User=: twtrace drops privileges itself"
    );
    assert!(unit_value(&entries, "DynamicUser").is_empty());

    let bounding: Vec<&str> = unit_value(&entries, "CapabilityBoundingSet");
    assert_eq!(bounding.len(), 1, "one CapabilityBoundingSet= line");
    let bounding: BTreeSet<String> = bounding[0]
        .split_whitespace()
        .map(|c| {
            c.strip_prefix("CAP_")
                .unwrap_or_else(|| panic!("{c}: capabilities are spelled CAP_*"))
                .to_owned()
        })
        .collect();
    assert_eq!(bounding, expected_caps(), "CapabilityBoundingSet=");
    // An ambient set would survive the drop to nobody.
    for v in unit_value(&entries, "AmbientCapabilities") {
        assert!(v.is_empty(), "AmbientCapabilities={v}: must stay empty");
    }

    // systemd knows every capability by that name.
    let known = combined(&output(Command::new(&analyze).arg("capability")));
    for cap in CAPS {
        let name = format!("cap_{}", cap.to_lowercase());
        assert!(
            known
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&name)),
            "systemd does not know {name}: {known}"
        );
    }

    let want = [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectControlGroups", "yes"),
        (
            "RestrictAddressFamilies",
            "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        ),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("Restart", "on-failure"),
    ];
    for (key, value) in want {
        assert_eq!(unit_value(&entries, key), [value], "{key}=");
    }
    // ProtectKernelLogs= would remove CAP_SYSLOG (kallsyms addresses), PrivateUsers= would make
    // every capability useless for loading BPF programs.
    for key in ["ProtectKernelLogs", "PrivateUsers", "PrivateNetwork"] {
        for v in unit_value(&entries, key) {
            assert!(
                !matches!(v, "yes" | "true" | "1" | "on"),
                "{key}={v} breaks twtrace (see the unit's header)"
            );
        }
    }
    // No tracefs: no dependency on its mount unit (nor sys-kernel-debug.mount), no path
    // setting for it, in any setting of the unit.
    for (section, key, value) in &entries {
        for word in TRACEFS.iter().chain(&["sys-kernel-debug.mount"]) {
            assert!(
                !value.contains(word),
                "[{section}] {key}={value}: serve reads no tracefs, the unit must not mention {word}"
            );
        }
    }
    assert!(
        unit_value(&entries, "Requires").is_empty(),
        "no Requires=: serve needs no mount unit"
    );
    // The allow list: a service's ordinary calls and bpf(), which loads and attaches the
    // programs; nothing else (BTF tracepoints need no perf_event_open, @debug).
    let allowed: BTreeSet<&str> = unit_value(&entries, "SystemCallFilter")
        .into_iter()
        .filter(|v| !v.starts_with('~'))
        .flat_map(str::split_whitespace)
        .collect();
    assert_eq!(
        allowed,
        BTreeSet::from(["@system-service", "bpf"]),
        "SystemCallFilter= (allow list)"
    );
}

/// `systemd-analyze security --offline=yes`: the exposure systemd computes for the unit,
/// printed, and kept low (it is 2.3 with the unit as written; the limit leaves room for one
/// setting, not for losing the hardening).
#[test]
fn systemd_unit_security_exposure() {
    let analyze = tool("systemd-analyze", "systemd");
    let unit = deploy().join("systemd/twtrace.service");
    let out = output(
        Command::new(&analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit),
    );
    let all = combined(&out);
    if all.contains("--offline") && !out.status.success() {
        panic!("this systemd-analyze has no --offline (systemd >= 250 needed): {all}");
    }
    let line = all
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure figure in: {all}"));
    // Shown even when the harness captures the test's output: straight to the real stderr.
    let shown = format!("systemd-analyze security: {}\n", line.trim());
    match fs::OpenOptions::new().append(true).open("/dev/stderr") {
        Ok(mut stderr) => {
            let _ = stderr.write_all(shown.as_bytes());
        }
        Err(_) => print!("{shown}"),
    }
    let figure: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure in: {line}"));
    assert!(
        figure <= 3.5,
        "exposure {figure} > 3.5: the unit lost hardening\n{all}"
    );
}

// =============================================================================================
// Prometheus

fn promtool() -> PathBuf {
    tool("promtool", "prometheus")
}

fn promtool_ok(args: &[&str]) -> String {
    let out = output(
        Command::new(promtool())
            .args(args)
            .current_dir(deploy().join("prometheus")),
    );
    let all = combined(&out);
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{all}",
        args.join(" "),
        out.status
    );
    all
}

#[test]
fn prometheus_rules_check() {
    let out = promtool_ok(&["check", "rules", "alerts.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn prometheus_config_check() {
    let out = promtool_ok(&["check", "config", "prometheus.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
    let config = read(&deploy().join("prometheus/prometheus.yml"));
    assert!(
        config.contains("- alerts.yml"),
        "prometheus.yml loads alerts.yml"
    );
    assert!(
        config.contains("\"127.0.0.1:9979\""),
        "prometheus.yml scrapes the local twtrace"
    );
    assert!(
        config.contains("job_name: twtrace"),
        "the job name matches TwtraceDown's up{{job=~\"twtrace.*\"}}"
    );
}

#[test]
fn prometheus_alert_unit_tests() {
    let out = promtool_ok(&["test", "rules", "alerts_test.yml"]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// One alerting rule of alerts.yml, read line by line (the file is ours: one rule per
/// `- alert:` item, `expr:` on one line).
struct Rule {
    name: String,
    block: String,
    expr: String,
}

fn rules() -> Vec<Rule> {
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

/// Every alert the brief asks for, each with `for:`, a severity and annotations that say
/// what to do; and every alert is unit-tested both ways in alerts_test.yml.
#[test]
fn prometheus_alerts_are_complete_and_tested() {
    let rules = rules();
    let names: BTreeSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    for want in [
        "TwtraceEphemeralPortsLow",
        "TwtraceTimeWaitOverflow",
        "TwtraceEventsLost",
        "TwtraceCloseWaitGrowing",
        "TwtraceDown",
    ] {
        assert!(names.contains(want), "alerts.yml lacks {want}");
    }
    for r in &rules {
        assert!(!r.expr.is_empty(), "{}: no one-line expr", r.name);
        for key in ["for:", "severity:", "summary:", "description:"] {
            assert!(r.block.contains(key), "{}: no {key}", r.name);
        }
        let severity = r
            .block
            .lines()
            .find_map(|l| l.trim().strip_prefix("severity:"))
            .map(str::trim)
            .unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{}: severity {severity:?}",
            r.name
        );
    }
    let expr = |n: &str| &rules.iter().find(|r| r.name == n).unwrap().expr;
    assert!(expr("TwtraceEphemeralPortsLow").contains("twtrace_peer_port_usage_ratio"));
    assert!(expr("TwtraceEphemeralPortsLow").contains("> 0.8"));
    assert_eq!(
        expr("TwtraceTimeWaitOverflow"),
        "increase(twtrace_timewait_skipped_total[5m]) > 0"
    );
    assert_eq!(expr("TwtraceDown"), "up{job=~\"twtrace.*\"} == 0");
    assert!(expr("TwtraceCloseWaitGrowing").contains("[15m]"));

    // alerts_test.yml: each alert has a case where it fires and one where it must not.
    let tests = read(&deploy().join("prometheus/alerts_test.yml"));
    let lines: Vec<&str> = tests.lines().collect();
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for (i, l) in lines.iter().enumerate() {
        let Some(name) = l.trim().strip_prefix("alertname:") else {
            continue;
        };
        let exp = lines[i + 1..]
            .iter()
            .find_map(|l| l.trim().strip_prefix("exp_alerts:"))
            .unwrap_or_else(|| panic!("alerts_test.yml:{}: no exp_alerts", i + 1));
        if exp.trim() == "[]" {
            silent.insert(name.trim().to_owned());
        } else {
            fires.insert(name.trim().to_owned());
        }
    }
    for name in &names {
        assert!(
            fires.contains(*name),
            "alerts_test.yml never sees {name} fire"
        );
        assert!(
            silent.contains(*name),
            "alerts_test.yml never checks that {name} stays silent"
        );
    }
}

/// docs/metrics.md: metric name -> its labels. Histograms also have _bucket (with `le`),
/// _sum and _count.
fn documented_metrics() -> BTreeMap<String, BTreeSet<String>> {
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

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `twtrace_*` names in a text, each with the label names of a `{...}` right behind it.
fn metric_uses(text: &str) -> Vec<(String, Vec<String>)> {
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

/// The rules use the metrics contract of docs/metrics.md, names and labels, exactly: a
/// renamed metric or label fails here rather than in a silent alert.
#[test]
fn prometheus_alerts_use_documented_metrics_and_labels() {
    let metrics = documented_metrics();
    // Labels Prometheus adds to every series it scrapes.
    let target_labels = ["instance", "job"];
    let alerts = read(&deploy().join("prometheus/alerts.yml"));
    for (name, labels) in metric_uses(&alerts) {
        let known = metrics
            .get(&name)
            .unwrap_or_else(|| panic!("alerts.yml uses {name}, not in docs/metrics.md"));
        for l in labels {
            assert!(
                known.contains(&l) || target_labels.contains(&l.as_str()),
                "alerts.yml: {name} has no label {l} (docs/metrics.md: {known:?})"
            );
        }
    }
    for rule in rules() {
        let used: Vec<(String, Vec<String>)> = metric_uses(&rule.expr);
        let mut allowed: BTreeSet<String> = target_labels.iter().map(|s| s.to_string()).collect();
        for (name, _) in &used {
            allowed.extend(metrics[name].iter().cloned());
        }
        // Labels the rule reads: `by (...)` in expr, $labels.X in its annotations.
        let mut read_labels = Vec::new();
        if let Some(i) = rule.expr.find("by (") {
            let inner = &rule.expr[i + 4..];
            let inner = &inner[..inner.find(')').expect("by (...)")];
            read_labels.extend(inner.split(',').map(|s| s.trim().to_owned()));
        }
        let mut rest = rule.block.as_str();
        while let Some(i) = rest.find("$labels.") {
            rest = &rest[i + 8..];
            read_labels.push(rest.chars().take_while(|c| is_ident(*c)).collect());
        }
        for l in read_labels {
            assert!(
                allowed.contains(&l),
                "{}: label {l} is not on its metrics ({allowed:?})",
                rule.name
            );
        }
    }
}

// =============================================================================================
// Kubernetes

/// Parses YAML files with PyYAML (duplicate keys refused) and checks each document whose kind
/// the Kubernetes API models of python3-kubernetes know: every field name, every scalar type,
/// every list and map, and the required fields. Prints JSON: the documents of each file, the
/// errors, and the kinds it had no model for.
const K8S_CHECK: &str = r#"
import json, sys
try:
    import yaml
except ImportError:
    print(json.dumps({"missing": "python3-yaml"})); sys.exit(0)
try:
    import kubernetes.client as models
except ImportError:
    print(json.dumps({"missing": "python3-kubernetes"})); sys.exit(0)

class Strict(yaml.SafeLoader):
    pass

def mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, "duplicate key %r" % (key,), key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)

Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)

# Resource quantities are strings in the models, numbers are fine in YAML ("cpu: 1").
QUANTITY_MAPS = {"limits", "requests"}
errors = []

def check(value, typ, path, parent_key=None):
    if typ.startswith("list["):
        if not isinstance(value, list):
            errors.append("%s: expected a list (%s), got %r" % (path, typ, value)); return
        for i, item in enumerate(value):
            check(item, typ[5:-1], "%s[%d]" % (path, i))
        return
    if typ.startswith("dict("):
        inner = typ[5:-1].split(", ", 1)[1]
        if not isinstance(value, dict):
            errors.append("%s: expected a map (%s), got %r" % (path, typ, value)); return
        for k, v in value.items():
            if not isinstance(k, str):
                errors.append("%s: key %r is not a string" % (path, k))
            check(v, inner, "%s.%s" % (path, k), path.rsplit(".", 1)[-1])
        return
    if typ == "object":
        return
    if typ in ("str", "datetime", "date"):
        ok = isinstance(value, str) or (
            parent_key in QUANTITY_MAPS and isinstance(value, (int, float))
            and not isinstance(value, bool))
    elif typ == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif typ == "bool":
        ok = isinstance(value, bool)
    else:
        cls = getattr(models, typ, None)
        if cls is None:
            errors.append("%s: no model %s" % (path, typ)); return
        if not isinstance(value, dict):
            errors.append("%s: expected an object (%s), got %r" % (path, typ, value)); return
        by_json = {v: k for k, v in cls.attribute_map.items()}
        kwargs = {}
        for k, v in value.items():
            if k not in by_json:
                errors.append("%s: unknown field %r in %s (known: %s)"
                              % (path, k, typ, ", ".join(sorted(by_json))))
                continue
            kwargs[by_json[k]] = v
            check(v, cls.openapi_types[by_json[k]], "%s.%s" % (path, k))
        try:
            cls(**kwargs)  # required fields and allowed values
        except (ValueError, TypeError) as e:
            errors.append("%s: %s" % (path, e))
        return
    if not ok:
        errors.append("%s: expected %s, got %r" % (path, typ, value))

out = {"files": {}, "unchecked": []}
for path in sys.argv[1:]:
    try:
        with open(path) as f:
            docs = [d for d in yaml.load_all(f, Loader=Strict) if d is not None]
    except yaml.YAMLError as e:
        errors.append("%s: %s" % (path, e)); continue
    out["files"][path] = docs
    for i, doc in enumerate(docs):
        where = "%s#%d" % (path, i)
        if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
            errors.append("%s: not a Kubernetes object" % where); continue
        version = str(doc["apiVersion"]).split("/")[-1]
        model = version[:1].upper() + version[1:] + str(doc["kind"])
        if getattr(models, model, None) is None:
            out["unchecked"].append("%s %s" % (doc["apiVersion"], doc["kind"])); continue
        check(doc, model, "%s(%s)" % (where, doc["kind"]))
out["errors"] = errors
print(json.dumps(out, default=str))
"#;

struct K8s {
    /// file name -> its documents
    files: BTreeMap<String, Vec<Value>>,
}

impl K8s {
    fn load() -> Self {
        // Debian's interpreter: the modules come from Debian's packages.
        let python = Path::new("/usr/bin/python3");
        assert!(
            python.is_file(),
            "/usr/bin/python3 is missing: install Debian's `python3`, `python3-yaml` and \
             `python3-kubernetes` packages (`cargo +stable xtask setup` does it)"
        );
        let dir = deploy().join("kubernetes");
        let names = ["daemonset.yaml", "servicemonitor.yaml"];
        let out = output(
            Command::new(python)
                .arg("-c")
                .arg(K8S_CHECK)
                .args(names.map(|n| dir.join(n)))
                // The user's site-packages must not stand in for Debian's.
                .env("PYTHONNOUSERSITE", "1"),
        );
        assert!(
            out.status.success(),
            "the YAML checker failed: {}",
            combined(&out)
        );
        let v: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("checker output is not JSON ({e}): {}", combined(&out)));
        if let Some(pkg) = v["missing"].as_str() {
            panic!(
                "Python module missing: install Debian's `{pkg}` package (`apt-get install -y \
                 {pkg}`; `cargo +stable xtask setup` does it)"
            );
        }
        let errors: Vec<&str> = v["errors"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            errors.is_empty(),
            "Kubernetes manifests:\n{}",
            errors.join("\n")
        );
        // Only the CRD is left to our own checks.
        let unchecked: Vec<&str> = v["unchecked"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(unchecked, ["monitoring.coreos.com/v1 ServiceMonitor"]);
        let files = v["files"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(path, docs)| {
                let name = Path::new(path)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                (name, docs.as_array().unwrap().clone())
            })
            .collect();
        K8s { files }
    }

    fn doc(&self, file: &str, kind: &str) -> &Value {
        let docs: Vec<&Value> = self.files[file]
            .iter()
            .filter(|d| d["kind"] == kind)
            .collect();
        assert_eq!(docs.len(), 1, "{file}: exactly one {kind}");
        docs[0]
    }
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_else(|| panic!("not a string: {s}")))
        .collect()
}

#[test]
fn kubernetes_manifests_match_the_api_and_each_other() {
    let k = K8s::load();
    let kinds: Vec<&str> = k.files["daemonset.yaml"]
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["Namespace", "ServiceAccount", "DaemonSet", "Service"]
    );

    let ns = k.doc("daemonset.yaml", "Namespace");
    let namespace = ns["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
        "hostPID/hostNetwork/hostPath need the privileged Pod Security level"
    );
    for doc in k.files.values().flatten() {
        if doc["kind"] != "Namespace" {
            assert_eq!(doc["metadata"]["namespace"], namespace, "{}", doc["kind"]);
        }
    }
    let sa = k.doc("daemonset.yaml", "ServiceAccount");
    assert_eq!(sa["automountServiceAccountToken"], false);

    // DaemonSet
    let ds = k.doc("daemonset.yaml", "DaemonSet");
    assert_eq!(ds["apiVersion"], "apps/v1");
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (key, value) in ds["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &pod_labels[key], value,
            "the selector matches the pod template"
        );
    }
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["serviceAccountName"], sa["metadata"]["name"]);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert!(
        pod["tolerations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["operator"] == "Exists"
                && t.get("key").is_none()
                && t.get("effect").is_none()),
        "a toleration of every taint: on every node"
    );
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9979");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let mut argv = strings(&c["command"]);
    argv.extend(strings(&c["args"]));
    assert_eq!(argv, CONTAINER_ARGV);
    let sc = &c["securityContext"];
    assert_eq!(
        sc["runAsUser"], 0,
        "twtrace starts as root and drops to nobody itself"
    );
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_ne!(sc["privileged"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<String> = strings(&sc["capabilities"]["add"])
        .into_iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(added, expected_caps(), "capabilities.add");
    assert_eq!(c["resources"]["requests"]["memory"], "64Mi");
    assert_eq!(c["resources"]["limits"]["memory"], "128Mi");
    assert_eq!(c["resources"]["requests"]["cpu"], "50m");
    assert_eq!(c["resources"]["limits"]["cpu"], "200m");

    let port_named = |name: &Value| -> u64 {
        if let Some(n) = name.as_u64() {
            return n;
        }
        c["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == *name)
            .unwrap_or_else(|| panic!("no container port named {name}"))["containerPort"]
            .as_u64()
            .unwrap()
    };
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], "/healthz", "{probe}");
        assert_eq!(port_named(&get["port"]), 9979, "{probe}");
    }

    // Host paths, read-only, where twtrace looks for them: the kernel's BTF and nothing else
    // (no tracefs).
    let btf = "/sys/kernel/btf";
    let volumes = pod["volumes"].as_array().unwrap();
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert_eq!(volumes.len(), 1, "one volume, {btf}: {volumes:?}");
    assert_eq!(mounts.len(), 1, "one volume mount, {btf}: {mounts:?}");
    assert_eq!(volumes[0]["hostPath"]["path"], btf, "the hostPath volume");
    assert_eq!(
        mounts[0]["name"], volumes[0]["name"],
        "the volume is mounted"
    );
    assert_eq!(mounts[0]["mountPath"], btf);
    assert_eq!(mounts[0]["readOnly"], true, "{btf} is mounted read-only");

    // The headless Service selects the pods and names the port the ServiceMonitor scrapes.
    let svc = k.doc("daemonset.yaml", "Service");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    for (key, value) in svc["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[key], value, "the Service selects the pods");
    }
    let svc_port = &svc["spec"]["ports"][0];
    assert_eq!(svc_port["port"], 9979);
    assert_eq!(port_named(&svc_port["targetPort"]), 9979);

    // ServiceMonitor: its selector finds the Service, its endpoint the named port, and the job
    // label (the Service's name) matches TwtraceDown's up{job=~"twtrace.*"}.
    let sm = k.doc("servicemonitor.yaml", "ServiceMonitor");
    check_service_monitor_fields(sm);
    for (key, value) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &svc["metadata"]["labels"][key], value,
            "the ServiceMonitor selects the Service"
        );
    }
    assert!(strings(&sm["spec"]["namespaceSelector"]["matchNames"]).contains(&namespace));
    let endpoints = sm["spec"]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    assert_eq!(endpoints[0]["port"], svc_port["name"]);
    assert_eq!(endpoints[0]["path"], "/metrics");
    assert!(sm["spec"].get("jobLabel").is_none());
    assert!(
        svc["metadata"]["name"]
            .as_str()
            .unwrap()
            .starts_with("twtrace"),
        "job label = Service name, must match up{{job=~\"twtrace.*\"}}"
    );
}

/// The ServiceMonitor fields this file may use (monitoring.coreos.com/v1, as the Prometheus
/// Operator's API reference documents them): a typo is an unknown key here.
fn check_service_monitor_fields(sm: &Value) {
    fn keys_within(v: &Value, what: &str, allowed: &[&str]) {
        for k in v
            .as_object()
            .unwrap_or_else(|| panic!("{what}: not an object"))
            .keys()
        {
            assert!(
                allowed.contains(&k.as_str()),
                "ServiceMonitor {what}: unknown field {k} (known: {allowed:?})"
            );
        }
    }
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    keys_within(sm, "", &["apiVersion", "kind", "metadata", "spec"]);
    keys_within(
        &sm["metadata"],
        "metadata",
        &["name", "namespace", "labels", "annotations"],
    );
    keys_within(
        &sm["spec"],
        "spec",
        &[
            "selector",
            "namespaceSelector",
            "endpoints",
            "jobLabel",
            "targetLabels",
            "podTargetLabels",
            "sampleLimit",
            "targetLimit",
            "labelLimit",
            "labelNameLengthLimit",
            "labelValueLengthLimit",
            "attachMetadata",
            "keepDroppedTargets",
            "scrapeProtocols",
            "scrapeClass",
            "bodySizeLimit",
        ],
    );
    keys_within(
        &sm["spec"]["selector"],
        "selector",
        &["matchLabels", "matchExpressions"],
    );
    keys_within(
        &sm["spec"]["namespaceSelector"],
        "namespaceSelector",
        &["any", "matchNames"],
    );
    for ep in sm["spec"]["endpoints"].as_array().unwrap() {
        keys_within(
            ep,
            "endpoint",
            &[
                "port",
                "targetPort",
                "path",
                "scheme",
                "params",
                "interval",
                "scrapeTimeout",
                "tlsConfig",
                "bearerTokenFile",
                "bearerTokenSecret",
                "authorization",
                "honorLabels",
                "honorTimestamps",
                "trackTimestampsStaleness",
                "basicAuth",
                "oauth2",
                "metricRelabelings",
                "relabelings",
                "proxyUrl",
                "followRedirects",
                "enableHttp2",
                "filterRunning",
            ],
        );
        for relabel in ["relabelings", "metricRelabelings"] {
            for r in ep[relabel]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                keys_within(
                    r,
                    relabel,
                    &[
                        "sourceLabels",
                        "separator",
                        "targetLabel",
                        "regex",
                        "modulus",
                        "replacement",
                        "action",
                    ],
                );
            }
        }
        for key in ["interval", "scrapeTimeout"] {
            if let Some(d) = ep[key].as_str() {
                let digits = d.trim_end_matches(|c: char| c.is_ascii_alphabetic());
                assert!(
                    !digits.is_empty()
                        && digits.chars().all(|c| c.is_ascii_digit())
                        && ["ms", "s", "m", "h"].contains(&&d[digits.len()..]),
                    "ServiceMonitor {key}: {d} is not a Prometheus duration"
                );
            }
        }
    }
}

// =============================================================================================
// Dockerfile

const INSTRUCTIONS: [&str; 18] = [
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
];

#[derive(Debug)]
struct Instruction {
    line: usize,
    keyword: String,
    args: String,
}

/// Docker's line syntax: comments, `\` continuations (comment lines inside them dropped),
/// keyword + arguments. Heredocs are refused (this file has none).
fn parse_dockerfile(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_none()) {
            continue;
        }
        let (continues, body) = match trimmed.strip_suffix('\\') {
            Some(b) => (true, b),
            None => (false, trimmed),
        };
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        acc.push_str(body);
        acc.push(' ');
        if continues {
            pending = Some((start, acc));
            continue;
        }
        let acc = acc.trim();
        if acc.is_empty() {
            continue;
        }
        let (keyword, args) = acc.split_once(char::is_whitespace).unwrap_or((acc, ""));
        assert!(
            INSTRUCTIONS.contains(&keyword),
            "Dockerfile:{start}: `{keyword}` is not a Dockerfile instruction (in upper case)"
        );
        assert!(
            !args.contains("<<"),
            "Dockerfile:{start}: heredocs are not parsed here"
        );
        out.push(Instruction {
            line: start,
            keyword: keyword.to_owned(),
            args: args.trim().to_owned(),
        });
    }
    assert!(pending.is_none(), "Dockerfile ends inside a continuation");
    out
}

/// `["a", "b"]`: the exec form, as JSON.
fn exec_form(ins: &Instruction) -> Vec<String> {
    serde_json::from_str(&ins.args).unwrap_or_else(|e| {
        panic!(
            "Dockerfile:{}: {} must use the exec form (a JSON array): {e}",
            ins.line, ins.keyword
        )
    })
}

/// The value of `const NAME: &str = "...";` in a Rust file.
fn rust_const(path: &Path, name: &str) -> String {
    let text = read(path);
    let prefix = format!("const {name}: &str = \"");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("{}: no {prefix}...\"", path.display()))
        .to_owned()
}

struct Stage<'a> {
    name: String,
    image: String,
    body: Vec<&'a Instruction>,
}

fn stages(instructions: &[Instruction]) -> Vec<Stage<'_>> {
    let mut out: Vec<Stage> = Vec::new();
    for ins in instructions {
        if ins.keyword == "FROM" {
            let words: Vec<&str> = ins.args.split_whitespace().collect();
            let words: Vec<&str> = words.into_iter().filter(|w| !w.starts_with("--")).collect();
            assert!(
                words.len() == 3 && words[1].eq_ignore_ascii_case("AS"),
                "Dockerfile:{}: every stage is named (FROM image AS name): {}",
                ins.line,
                ins.args
            );
            assert!(
                !out.iter().any(|s| s.name == words[2]),
                "Dockerfile:{}: stage {} twice",
                ins.line,
                words[2]
            );
            out.push(Stage {
                name: words[2].to_owned(),
                image: words[0].to_owned(),
                body: Vec::new(),
            });
        } else {
            let stage = out.last_mut().unwrap_or_else(|| {
                panic!(
                    "Dockerfile:{}: {} before the first FROM (not used in this file)",
                    ins.line, ins.keyword
                )
            });
            stage.body.push(ins);
        }
    }
    out
}

#[test]
fn dockerfile_builds_with_the_project_toolchain_and_runs_serve() {
    let path = deploy().join("docker/Dockerfile");
    let text = read(&path);
    let instructions = parse_dockerfile(&text);
    let stages = stages(&instructions);
    assert!(stages.len() >= 2, "a multi-stage build");

    // COPY --from names an earlier stage.
    for (i, stage) in stages.iter().enumerate() {
        for ins in &stage.body {
            if let Some(from) = ins
                .args
                .split_whitespace()
                .find_map(|w| w.strip_prefix("--from="))
            {
                assert!(
                    stages[..i].iter().any(|s| s.name == from),
                    "Dockerfile:{}: --from={from} is not an earlier stage",
                    ins.line
                );
            }
        }
    }

    // Builder: the toolchain of rust-toolchain.toml and of `xtask setup`.
    let toolchain = read(&root().join("rust-toolchain.toml"));
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = \""))
        .and_then(|r| r.split('"').next())
        .expect("rust-toolchain.toml: channel");
    let setup = root().join("xtask/src/setup.rs");
    let llvm = rust_const(&setup, "LLVM");
    let linker = rust_const(&setup, "BPF_LINKER");
    let builder = &stages[0];
    assert!(
        builder.image.starts_with(&format!("rust:{channel}-")),
        "the builder uses Rust {channel} (rust-toolchain.toml): {}",
        builder.image
    );
    let runs: String = builder
        .body
        .iter()
        .filter(|i| i.keyword == "RUN")
        .map(|i| i.args.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for want in [
        format!("llvm-{llvm}-dev"),
        format!("PATH=/usr/lib/llvm-{llvm}/bin:$PATH cargo install --locked bpf-linker@{linker}"),
        format!("--no-default-features --features llvm-{llvm}"),
        "rust-src".to_owned(),
        "cargo build --release --locked".to_owned(),
    ] {
        assert!(
            runs.contains(&want),
            "the builder does not run `{want}`:\n{runs}"
        );
    }

    // Runtime: the binary on Debian slim, root (twtrace drops privileges itself), serving.
    let runtime = stages.last().unwrap();
    assert_eq!(runtime.image, "debian:bookworm-slim");
    let find = |kw: &str| -> Vec<&Instruction> {
        runtime
            .body
            .iter()
            .copied()
            .filter(|i| i.keyword == kw)
            .collect()
    };
    assert!(
        find("USER").is_empty(),
        "no USER: twtrace must start as root"
    );
    let [entrypoint] = find("ENTRYPOINT")[..] else {
        panic!("one ENTRYPOINT in the final stage")
    };
    let [cmd] = find("CMD")[..] else {
        panic!("one CMD in the final stage")
    };
    let mut argv = exec_form(entrypoint);
    argv.extend(exec_form(cmd));
    assert_eq!(argv, CONTAINER_ARGV);
    assert!(
        find("COPY").iter().any(|c| c.args.starts_with("--from=")
            && c.args.split_whitespace().last() == Some(argv[0].as_str())),
        "the final stage copies the binary from the builder to {}",
        argv[0]
    );
    assert!(
        find("EXPOSE").iter().any(|e| e
            .args
            .split_whitespace()
            .any(|p| p == "9979" || p == "9979/tcp")),
        "EXPOSE 9979"
    );
    let [health] = find("HEALTHCHECK")[..] else {
        panic!("one HEALTHCHECK in the final stage")
    };
    assert!(health.args.contains("/healthz"), "{}", health.args);

    // The documented run line: the capability set, no --privileged, the host mounts.
    let run_line: String = text
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .skip_while(|l| !l.trim_start().starts_with("docker run"))
        .take_while(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .replace('\\', " ");
    assert!(
        !run_line.is_empty(),
        "no `docker run` line in the Dockerfile's comments"
    );
    let words: Vec<&str> = run_line.split_whitespace().collect();
    let added: BTreeSet<String> = words
        .iter()
        .filter_map(|w| w.strip_prefix("--cap-add="))
        .map(str::to_owned)
        .collect();
    assert_eq!(added, expected_caps(), "docker run --cap-add");
    assert!(
        !words
            .iter()
            .any(|w| w.starts_with("--cap-add") && !w.contains('=')),
        "docker run: spell capabilities --cap-add=NAME (checked above): {run_line}"
    );
    for want in ["--cap-drop=ALL", "--pid=host", "--network=host"] {
        assert!(words.contains(&want), "docker run lacks {want}: {run_line}");
    }
    // Host mounts: the kernel's BTF, read-only, and nothing else (no tracefs).
    let mut mounts = Vec::new();
    let mut rest = words.iter();
    while let Some(w) = rest.next() {
        if ["-v", "--volume", "--mount"].contains(w) {
            mounts.push(rest.next().copied().unwrap_or_default());
        } else if let Some(m) = ["--volume=", "--mount="]
            .iter()
            .find_map(|p| w.strip_prefix(p))
        {
            mounts.push(m);
        }
    }
    assert_eq!(
        mounts,
        ["/sys/kernel/btf:/sys/kernel/btf:ro"],
        "docker run host mounts: {run_line}"
    );
    for word in TRACEFS {
        assert!(
            !run_line.contains(word),
            "docker run: serve reads no tracefs, no {word}: {run_line}"
        );
    }
    assert!(
        !words.contains(&"--privileged"),
        "docker run must not be --privileged"
    );
}

/// One HTTP exchange on `listener`: returns the request line, answers with `status`.
fn serve_once(listener: TcpListener, status: &'static str) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request = String::new();
        reader.read_line(&mut request).unwrap();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 2 {
            line.clear();
        }
        let mut stream = stream;
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
        );
        request.trim().to_owned()
    })
}

/// The HEALTHCHECK command, run as Docker would run it (against a local server on another
/// port): success on 200 for GET /healthz, failure on 503.
#[test]
fn dockerfile_healthcheck_command_works() {
    let text = read(&deploy().join("docker/Dockerfile"));
    let health = parse_dockerfile(&text)
        .into_iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .expect("HEALTHCHECK");
    let json = &health.args[health
        .args
        .find("CMD [")
        .expect("HEALTHCHECK ... CMD [...]")
        + 4..];
    let argv: Vec<String> = serde_json::from_str(json).expect("HEALTHCHECK CMD in exec form");
    assert!(
        argv.join(" ").contains("9979"),
        "the health check asks port 9979"
    );
    tool("bash", "bash");
    for (status, ok) in [("200 OK", true), ("503 Service Unavailable", false)] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = serve_once(listener, status);
        let argv: Vec<String> = argv
            .iter()
            .map(|a| a.replace("9979", &port.to_string()))
            .collect();
        let out = output(Command::new(&argv[0]).args(&argv[1..]));
        assert_eq!(server.join().unwrap(), "GET /healthz HTTP/1.0");
        assert_eq!(
            out.status.success(),
            ok,
            "health check against {status}: {} {}",
            out.status,
            combined(&out)
        );
    }
}

// =============================================================================================
// The README

/// The README's capability table lists exactly the capabilities granted, each with its reason,
/// and every alert is explained.
#[test]
fn readme_explains_every_capability_and_alert() {
    let readme = read(&deploy().join("README.md"));
    let mut table = BTreeSet::new();
    for line in readme
        .lines()
        .skip_while(|l| !l.starts_with("| capability | why |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
    {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        assert!(
            cells.len() >= 4 && !cells[2].is_empty(),
            "deploy/README.md: capability row without a reason: {line}"
        );
        for cap in cells[1].split(',') {
            let name = cap
                .trim()
                .strip_prefix("`CAP_")
                .and_then(|c| c.strip_suffix('`'))
                .unwrap_or_else(|| panic!("deploy/README.md: not a `CAP_*` name: {cap}"));
            assert!(
                table.insert(name.to_owned()),
                "deploy/README.md: {name} twice"
            );
        }
    }
    assert_eq!(
        table,
        expected_caps(),
        "deploy/README.md: the capability table"
    );
    for rule in rules() {
        assert!(
            readme.contains(&rule.name),
            "deploy/README.md: {}",
            rule.name
        );
    }
}
