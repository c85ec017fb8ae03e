//! The Prometheus files of `deploy/prometheus/`, checked by `promtool check rules`, `promtool
//! check config` and `promtool test rules`; and every metric and label the rules use exists in
//! docs/metrics.md.
//!
//! A missing tool fails the test and names the Debian package that brings it (`cargo +stable
//! xtask setup` installs them). Nothing here needs root or the network.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use twtrace_tests::deploy::{
    combined, deploy, documented_metrics, is_ident, metric_uses, output, read, rules, tool,
};

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
