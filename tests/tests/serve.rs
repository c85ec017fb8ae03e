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

    // Known churn to one peer, with the kernel counting program runs (a BPF_ENABLE_STATS
    // descriptor: it counts while held, and leaves kernel.bpf_stats_enabled as it is).
    let stats = enable_bpf_stats();
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

    // Every twtrace_ metric is in docs/metrics.md, with its labels.
    let documented = deploy::documented_metrics();
    let samples: String = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .flat_map(|l| [l, "\n"])
        .collect();
    for (name, labels) in deploy::metric_uses(&samples) {
        let doc = documented
            .get(&name)
            .unwrap_or_else(|| panic!("{name} is exported but not in docs/metrics.md"));
        for l in labels {
            assert!(doc.contains(&l), "{name}: label {l} not in docs/metrics.md");
        }
    }

    // Its own cost: the state program ran (at least one state change per connection) and took
    // time, the ring buffer delivered every birth, the process metrics are there.
    drop(stats);
    let runs = metric(
        &metrics,
        "twtrace_program_runs_total{program=\"inet_sock_set_state\"}",
    );
    assert!(runs >= N as f64, "state program runs: {runs}");
    let secs = metric(
        &metrics,
        "twtrace_program_run_seconds_total{program=\"inet_sock_set_state\"}",
    );
    assert!(secs > 0.0, "state program run time: {secs}");
    for p in ["timer_start", "timer_cancel", "timer_expire_entry"] {
        let name = format!("twtrace_program_recursion_misses_total{{program=\"{p}\"}}");
        assert_eq!(metric(&metrics, &name), 0.0, "{name}");
    }
    assert!(metric(&metrics, "twtrace_ring_buffer_records_total") >= N as f64);
    assert!(metric(&metrics, "twtrace_ring_buffer_size_bytes") > 0.0);
    let fill = metric(&metrics, "twtrace_ring_buffer_fill_ratio");
    assert!((0.0..1.0).contains(&fill), "fill {fill}");
    let rss = metric(&metrics, "process_resident_memory_bytes");
    assert!(rss > 1e6 && rss < 200e6, "RSS {rss}");
    assert!(metric(&metrics, "process_cpu_seconds_total") > 0.0);
    assert!(metric(&metrics, "process_open_fds") > 0.0);

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

/// The value of the sample `name_and_labels` (exactly as exposed) in a scrape.
fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name_and_labels} not in the scrape:\n{text}"))
}

/// BPF_ENABLE_STATS (BPF_STATS_RUN_TIME): program runs and run time are counted while the
/// returned descriptor is open.
fn enable_bpf_stats() -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    const BPF_ENABLE_STATS: libc::c_long = 32;
    // union bpf_attr, enable_stats: { __u32 type } (BPF_STATS_RUN_TIME = 0), zero-padded.
    let attr = [0u8; 128];
    // SAFETY: attr is a zeroed bpf_attr of the length passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, attr.as_ptr(), attr.len()) };
    assert!(
        fd >= 0,
        "BPF_ENABLE_STATS: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a descriptor the kernel just returned to us.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) }
}
