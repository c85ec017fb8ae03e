//! A real Prometheus (Debian's `prometheus` package) for the tests: it scrapes a `twtrace
//! serve` once a second, and PromQL reads the figures back over its HTTP API.

use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::{TempDir, http_get};

/// A Prometheus server, stopped (and its data removed) on drop.
pub struct Prometheus {
    child: Child,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Prometheus on `listen`, scraping `target` as job `twtrace` every second.
pub fn start_prometheus(target: &str, listen: &str) -> Prometheus {
    start_prometheus_with_rules(target, listen, None)
}

/// The same, evaluating the alerting rules `rules` (the text of a rule file) every second.
pub fn start_prometheus_with_rules(target: &str, listen: &str, rules: Option<&str>) -> Prometheus {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = TempDir::new(&format!("prom{n}"));
    let config = dir.0.join("prometheus.yml");
    let rule_files = match rules {
        Some(text) => {
            std::fs::write(dir.0.join("rules.yml"), text).unwrap();
            "rule_files:\n  - rules.yml\n"
        }
        None => "",
    };
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n{rule_files}\
             scrape_configs:\n  - job_name: twtrace\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (Debian package `prometheus`; xtask setup installs it)");
    Prometheus { child, _dir: dir }
}

/// `s` as a URL query value (everything but unreserved characters percent-encoded).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `GET path` on Prometheus's API: the `data` of a `success` answer, or the error Prometheus
/// gave (the status and body when it is not JSON).
pub fn api(prom: &str, path: &str) -> Result<Value, String> {
    let (code, body) = http_get(prom, path);
    let v: Value = serde_json::from_str(&body).map_err(|_| format!("HTTP {code}: {body}"))?;
    if v["status"] == "success" {
        Ok(v["data"].clone())
    } else {
        Err(format!("{}: {}", v["errorType"], v["error"]))
    }
}

/// An instant PromQL query: the result vector (or scalar) Prometheus returned.
pub fn query(prom: &str, promql: &str) -> Result<Value, String> {
    api(prom, &format!("/api/v1/query?query={}", url_encode(promql)))
}

/// Instant PromQL query; the first sample's value.
pub fn promql(prom: &str, promql: &str) -> Option<f64> {
    query(prom, promql).ok()?["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
}
