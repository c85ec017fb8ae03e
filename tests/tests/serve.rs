//! `twtrace serve` as a fleet would run it: a real Prometheus scrapes it, PromQL reads the
//! births back; the daemon runs unprivileged after start-up and leaves nothing on SIGTERM.

use std::{
    io::Write,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use twtrace_tests::{
    prometheus::{promql, start_prometheus},
    *,
};

#[test]
fn prometheus_scrapes_the_births_of_our_peer_and_the_daemon_runs_unprivileged() {
    require_root();
    let _g = exclusive();
    let before = quiet_programs();
    let http_port = unique_port();
    let listen = format!("127.0.0.1:{http_port}");
    let serve = Run::start(&["serve", "--listen", &listen], "serving on");
    let pid = serve.pid();

    // Least privilege, from the kernel's own view of the process.
    let uid = proc_status(pid, "Uid");
    assert!(uid.split_whitespace().all(|u| u == "65534"), "Uid: {uid}");
    assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
    assert_eq!(proc_status(pid, "CapPrm"), "0000000000000000");
    assert_eq!(
        twtrace_programs_loaded(),
        before + 4,
        "attached before dropping"
    );

    let prom_port = unique_port();
    let prom_addr = format!("127.0.0.1:{prom_port}");
    let _prom = start_prometheus(&listen, &prom_addr);

    // Known churn to one peer.
    const N: u64 = 17;
    let peer_port = unique_port();
    let peer = format!("127.0.0.1:{peer_port}");
    let _server = Server::start(None, &peer, &[]);
    client(None, &["--to", &peer, "--count", &N.to_string()]);

    let query = format!("twtrace_timewait_entered_total{{group=\"peer\",key=\"{peer}\"}}");
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut seen = None;
    while Instant::now() < deadline {
        seen = promql(&prom_addr, &query);
        if seen == Some(N as f64) {
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(seen, Some(N as f64), "PromQL {query}");
    let tw_now = promql(
        &prom_addr,
        &format!("twtrace_timewait_sockets{{group=\"peer\",key=\"{peer}\"}}"),
    );
    assert_eq!(tw_now, Some(N as f64));

    // The exposition passes promtool's own checks.
    let (code, metrics) = http_get(&listen, "/metrics");
    assert_eq!(code, 200);
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The JSON API: the report's document, with the report's filters.
    let (code, body) = http_get(&listen, &format!("/api/v1/report?by=peer&port={peer_port}"));
    assert_eq!(code, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["by"], "peer");
    assert_eq!(doc["groups"][0]["key"], peer.as_str());
    assert_eq!(doc["groups"][0]["in_time_wait"], N, "{doc}");
    let (code, body) = http_get(&listen, "/api/v1/report?by=peer");
    assert_eq!(code, 200);
    let all: Value = serde_json::from_str(&body).unwrap();
    let g = all["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == peer.as_str())
        .expect("our peer in the unfiltered report");
    assert_eq!(g["entered"], N);

    // Everything else is refused without harm.
    assert_eq!(http_get(&listen, "/healthz").0, 200);
    assert_eq!(http_get(&listen, "/nope").0, 404);
    assert_eq!(
        http(
            &listen,
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .0,
        405
    );
    let (code, body) = http_get(&listen, "/api/v1/report?port=99999");
    assert_eq!(code, 400);
    assert!(body.contains("'99999'"), "{body}");
    assert_eq!(http(&listen, b"GARBAGE\r\n\r\n").0, 400);
    let huge = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let code = http(&listen, huge.as_bytes()).0;
    assert!(
        code == 431 || code == 400 || code == 0,
        "oversized header: {code}"
    );
    assert_eq!(http_get(&listen, "/healthz").0, 200, "still serving");

    // SIGTERM: exit 0, nothing left attached.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let r = serve.finish(Duration::from_secs(10));
    assert!(r.status.success(), "{:?}: {}", r.status, r.stderr);
    assert_eq!(settled_programs(before), before);
}
