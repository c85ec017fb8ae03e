//! Every query of the Grafana dashboard (deploy/grafana/twtrace.json: each panel's PromQL and
//! each variable's `label_values`), read from the JSON so that a new panel is tested without
//! touching this file, returns data from a real Prometheus scraping a real `twtrace serve`
//! under real loopback traffic: births to several peers, TIME_WAIT that ends (reused by a
//! connect from the same port), sockets held in CLOSE_WAIT.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use twtrace_tests::{
    deploy::{dashboard, dashboard_queries, dashboard_variables, label_values},
    prometheus::{api, query, start_prometheus, url_encode},
    *,
};

/// What Grafana would put in place of its variables for this Prometheus (scraping every
/// second): `$__rate_interval` is at least four scrape intervals.
fn substitute(text: &str, instance: &str) -> String {
    text.replace("$__rate_interval", "10s")
        .replace("$__range", "5m")
        .replace("$job", "twtrace")
        .replace("$instance", instance)
}

/// Data: a non-empty result whose samples are all numbers (a quantile of no ends is NaN).
fn has_data(data: &Value) -> bool {
    let samples: Vec<&Value> = match data["resultType"].as_str() {
        Some("vector") => data["result"]
            .as_array()
            .map(|r| r.iter().map(|s| &s["value"][1]).collect())
            .unwrap_or_default(),
        Some("scalar") => vec![&data["result"][1]],
        _ => Vec::new(),
    };
    !samples.is_empty()
        && samples.iter().all(|v| {
            v.as_str()
                .and_then(|s| s.parse::<f64>().ok())
                .is_some_and(f64::is_finite)
        })
}

#[test]
fn every_dashboard_query_returns_data() {
    require_root();
    let _g = shared();
    let http_port = unique_port();
    let listen = format!("127.0.0.1:{http_port}");
    let serve = Run::start(&["serve", "--listen", &listen], "serving on");
    let prom_addr = format!("127.0.0.1:{}", unique_port());
    let _prom = start_prometheus(&listen, &prom_addr);

    // CLOSE_WAIT: a server that never closes what its clients closed.
    let held_addr = format!("127.0.0.1:{}", unique_port());
    let _held = Server::start(None, &held_addr, &["--hold", "--name", "twt-leaky"]);
    client(None, &["--to", &held_addr, "--count", "3", "--hold"]);

    // Births to three peers, and, until the queries are done (two minutes at most), a
    // connection a second from one fixed port in a namespace with tcp_tw_reuse: each takes the
    // previous one's TIME_WAIT over, so births and ends (with their lifetimes) keep coming.
    let servers: Vec<(String, Server)> = (0..3)
        .map(|_| {
            let addr = format!("127.0.0.1:{}", unique_port());
            let s = Server::start(None, &addr, &[]);
            (addr, s)
        })
        .collect();
    for (i, (addr, _)) in servers.iter().enumerate() {
        client(None, &["--to", addr, "--count", &(5 * (i + 1)).to_string()]);
    }
    let ns = Arc::new(Netns::new("dash"));
    ns.exec_ok(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=2"]);
    let reuse_addr = format!("127.0.0.1:{}", unique_port());
    let _reuse_server = Server::start(Some(&*ns), &reuse_addr, &[]);
    let bind = format!("127.0.0.1:{}", unique_port());
    let done = Arc::new(AtomicBool::new(false));
    let churn = {
        let (ns, done) = (ns.clone(), done.clone());
        thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(120);
            while !done.load(Ordering::SeqCst) && Instant::now() < until {
                client(
                    Some(&*ns),
                    &["--to", &reuse_addr, "--count", "1", "--bind", &bind],
                );
                // tcp_tw_reuse wants the TIME_WAIT's last timestamp at least a second old.
                thread::sleep(Duration::from_millis(1200));
            }
        })
    };

    let d = dashboard();
    let queries: Vec<(String, String)> = dashboard_queries(&d)
        .into_iter()
        .map(|(place, expr)| (place, substitute(&expr, &listen)))
        .collect();
    let variables = dashboard_variables(&d);
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut failing: Vec<String>;
    loop {
        failing = Vec::new();
        for (place, expr) in &queries {
            match query(&prom_addr, expr) {
                Ok(data) if has_data(&data) => {}
                Ok(data) => failing.push(format!("{place}: {expr}\n  -> {data}")),
                Err(e) => failing.push(format!("{place}: {expr}\n  -> {e}")),
            }
        }
        // A variable lists our target: the job, then its instance.
        for ((name, q), want) in variables.iter().zip(["twtrace", listen.as_str()]) {
            let (selector, label) = label_values(&substitute(q, &listen));
            let path = format!(
                "/api/v1/label/{label}/values?match[]={}",
                url_encode(&selector)
            );
            match api(&prom_addr, &path) {
                Ok(values) if values.as_array().is_some_and(|v| v.contains(&want.into())) => {}
                other => failing.push(format!("variable {name}: {q}\n  -> {other:?}")),
            }
        }
        if failing.is_empty() || Instant::now() > deadline {
            break;
        }
        thread::sleep(Duration::from_secs(2));
    }
    done.store(true, Ordering::SeqCst);
    churn.join().expect("churn thread");
    assert!(
        failing.is_empty(),
        "{} of {} dashboard queries return no data:\n{}",
        failing.len(),
        queries.len() + variables.len(),
        failing.join("\n")
    );
    // SAFETY: signalling our own child.
    unsafe { libc::kill(serve.pid() as i32, libc::SIGTERM) };
    let r = serve.finish(Duration::from_secs(10));
    assert!(r.status.success(), "{}", r.stderr);
}
