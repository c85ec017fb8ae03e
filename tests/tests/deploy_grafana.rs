//! The Grafana dashboard, deploy/grafana/twtrace.json, follows the conventions of exporter
//! dashboards: a datasource variable, then job and instance; an overview row of stat panels
//! first; every query scoped to `$job`/`$instance` and ranged over `$__rate_interval`
//! (`$__range` for a stat over the dashboard's range); tables ranked with topk; a unit on
//! every panel; a runbook link for every alert; panels that do not overlap. Every metric and
//! label it uses is in docs/metrics.md.
//!
//! `tests/tests/dashboard.rs` evaluates every query against a real Prometheus. Nothing here
//! needs root or the network.

use std::collections::BTreeSet;

use twtrace_tests::deploy::{
    dashboard, dashboard_panels, dashboard_queries, dashboard_variables, documented_metrics,
    label_values, metric_uses, rules,
};

/// The selector every query carries: the variables narrow each metric to the chosen targets.
const SCOPE: [&str; 2] = ["job=~\"$job\"", "instance=~\"$instance\""];

#[test]
fn variables_are_datasource_then_job_then_instance() {
    let d = dashboard();
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let names: Vec<&str> = vars.iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["datasource", "job", "instance"]);
    assert_eq!(vars[0]["type"], "datasource");
    assert_eq!(vars[0]["query"], "prometheus");
    let queries = dashboard_variables(&d);
    assert_eq!(label_values(&queries[0].1).1, "job");
    let (selector, label) = label_values(&queries[1].1);
    assert_eq!(label, "instance");
    assert!(
        selector.contains(SCOPE[0]),
        "instance is narrowed by job: {selector}"
    );
    for v in &vars[1..] {
        assert_eq!(v["datasource"]["uid"], "${datasource}", "{}", v["name"]);
    }
}

#[test]
fn panels_follow_the_conventions() {
    let d = dashboard();
    let panels = dashboard_panels(&d);
    // The overview row first, holding stat panels only.
    assert_eq!(panels[0]["type"], "row");
    assert_eq!(panels[0]["title"], "Overview");
    let overview: Vec<_> = panels[1..]
        .iter()
        .take_while(|p| p["type"] != "row")
        .collect();
    assert!(overview.len() >= 4, "an overview of stats");
    assert!(overview.iter().all(|p| p["type"] == "stat"));

    let mut ids = BTreeSet::new();
    let mut cells = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().expect("every panel has a title");
        assert!(
            ids.insert(p["id"].as_u64().expect("id")),
            "{title}: id twice"
        );
        // The 24-column grid, no two panels on one cell.
        let g = &p["gridPos"];
        let (x, y, w, h) = (
            g["x"].as_u64().unwrap(),
            g["y"].as_u64().unwrap(),
            g["w"].as_u64().unwrap(),
            g["h"].as_u64().unwrap(),
        );
        assert!(x + w <= 24 && w > 0 && h > 0, "{title}: gridPos {g}");
        for cx in x..x + w {
            for cy in y..y + h {
                assert!(cells.insert((cx, cy)), "{title} overlaps another panel");
            }
        }
        if p["type"] == "row" {
            continue;
        }
        assert!(
            !p["description"].as_str().unwrap_or_default().is_empty(),
            "{title}: no description"
        );
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{title}");
        assert!(
            p["fieldConfig"]["defaults"]["unit"].as_str().is_some(),
            "{title}: no unit"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = t["expr"].as_str().expect("expr");
            if p["type"] == "table" {
                assert!(expr.starts_with("topk("), "{title}: a table ranks: {expr}");
                assert_eq!(t["format"], "table", "{title}");
                assert_eq!(t["instant"], true, "{title}");
            }
        }
    }
}

#[test]
fn queries_are_scoped_and_ranged_by_the_variables() {
    let d = dashboard();
    let queries = dashboard_queries(&d);
    assert!(queries.len() >= 20, "{} queries", queries.len());
    for (place, expr) in &queries {
        // Each metric selector names the job and the instance.
        let mut rest = expr.as_str();
        let mut selectors = 0;
        while let Some(i) = rest.find('{') {
            let close = rest[i..].find('}').expect("unclosed {") + i;
            let selector = &rest[i + 1..close];
            rest = &rest[close + 1..];
            // Legend templates are not in expr; every {...} here is a selector.
            selectors += 1;
            for s in SCOPE {
                assert!(selector.contains(s), "{place}: {{{selector}}} lacks {s}");
            }
        }
        assert!(selectors > 0, "{place}: no selector: {expr}");
        // Ranges come from Grafana: $__rate_interval for rates, $__range for a whole range.
        let mut rest = expr.as_str();
        while let Some(i) = rest.find('[') {
            let close = rest[i..].find(']').expect("unclosed [") + i;
            let range = &rest[i + 1..close];
            rest = &rest[close + 1..];
            assert!(
                range == "$__rate_interval"
                    || (range == "$__range" && expr.starts_with("sum(increase(")),
                "{place}: range [{range}]: use [$__rate_interval]"
            );
        }
    }
}

/// Every metric and label is in docs/metrics.md (a renamed metric fails here, not in a blank
/// panel).
#[test]
fn dashboard_uses_documented_metrics() {
    let d = dashboard();
    let metrics = documented_metrics();
    let texts: Vec<String> = dashboard_queries(&d)
        .into_iter()
        .map(|(_, e)| e)
        .chain(dashboard_variables(&d).into_iter().map(|(_, q)| q))
        .collect();
    for text in &texts {
        for (name, labels) in metric_uses(text) {
            let known = metrics
                .get(&name)
                .unwrap_or_else(|| panic!("the dashboard uses {name}, not in docs/metrics.md"));
            for l in labels {
                assert!(
                    known.contains(&l) || ["job", "instance"].contains(&l.as_str()),
                    "{name} has no label {l} (docs/metrics.md: {known:?})"
                );
            }
        }
    }
}

/// A panel about each alert links to its runbook (deploy/README.md's alert table).
#[test]
fn every_alert_has_a_runbook_link() {
    let d = dashboard();
    let links: Vec<(String, String)> = dashboard_panels(&d)
        .iter()
        .flat_map(|p| p["links"].as_array().into_iter().flatten())
        .map(|l| {
            (
                l["title"].as_str().unwrap_or_default().to_owned(),
                l["url"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for rule in rules() {
        let (_, url) = links
            .iter()
            .find(|(title, _)| *title == format!("Runbook: {}", rule.name))
            .unwrap_or_else(|| panic!("no panel links the runbook of {}", rule.name));
        assert!(
            url.ends_with("deploy/README.md#prometheus-and-the-alerts"),
            "{}: {url}",
            rule.name
        );
    }
}
