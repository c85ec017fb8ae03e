//! `twtrace serve` as an operator meets it: its bounded series follow the busiest destinations
//! (a real Prometheus evaluating the shipped alert), the usage ratio per source, `--by` and
//! `--sort` as the API's defaults, a busy port that is not "bad usage", and the exporter
//! conventions (a page on `/`, gzip, `--listen :PORT`, a log level).

use std::{
    io::{Read, Write},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use twtrace_tests::{
    deploy::{deploy, read},
    prometheus::{query, start_prometheus_with_rules},
    *,
};

/// deploy/prometheus/alerts.yml with every `for:` at 0s: the shipped expressions, evaluated at
/// once.
fn alerts_now() -> String {
    read(&deploy().join("prometheus/alerts.yml"))
        .lines()
        .map(|l| match l.find("for: ") {
            Some(i) if l.trim_start().starts_with("for:") => format!("{}for: 0s", &l[..i]),
            _ => l.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value of the first sample of an instant query, with its labels.
fn samples(prom: &str, promql: &str) -> Vec<Value> {
    query(prom, promql)
        .map(|d| d["result"].as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
}

fn wait_for(what: &str, limit: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !pred() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        thread::sleep(Duration::from_millis(500));
    }
}

/// The repro, scraped by a real Prometheus evaluating the shipped alert rules:
/// `--max-series 2`, 3 connections to one destination and 2 to another, a scrape, then 800 to a
/// third in a namespace of 900 ports: its series and its usage ratio appear, and
/// TwtraceEphemeralPortsLow fires for it. Beside it, 4 source addresses with 150 connections
/// each towards one destination, 200 ports: the ratio is 0.75 (each source's own ports), not
/// 3.0, and the alert stays silent.
#[test]
fn series_follow_the_busiest_and_the_alert_fires_for_a_destination_busy_late() {
    require_root();
    let _g = shared();
    let busy = Netns::new("late");
    busy.sysctl("net.ipv4.ip_local_port_range", "40000 40899");
    busy.sysctl("net.ipv4.tcp_tw_reuse", "0");
    let multi = Netns::new("multi");
    multi.sysctl("net.ipv4.ip_local_port_range", "40000 40199");
    multi.sysctl("net.ipv4.tcp_tw_reuse", "0");

    let listen = format!("127.0.0.1:{}", unique_port());
    // Only these namespaces: the host's other TIME_WAIT (other tests) must not take the two
    // series.
    let serve = Run::start(
        &[
            "serve",
            "--listen",
            &listen,
            "--max-series",
            "2",
            "--netns",
            &busy.name,
            "--netns",
            &multi.name,
        ],
        "serving on",
    );
    let prom = format!("127.0.0.1:{}", unique_port());
    let _prom = start_prometheus_with_rules(&listen, &prom, Some(&alerts_now()));

    let (p1, p2, p3, pm) = (unique_port(), unique_port(), unique_port(), unique_port());
    // Connections the host accepted and closed first: TIME_WAIT towards the clients' ports,
    // which are no destination of ours and never get a ratio.
    let inbound = format!("127.0.0.1:{}", unique_port());
    let _closer = Server::start(Some(&busy), &inbound, &["--closer", "server"]);
    client(
        Some(&busy),
        &["--to", &inbound, "--count", "50", "--closer", "server"],
    );
    let a1 = format!("127.0.0.1:{p1}");
    let a2 = format!("127.0.0.2:{p2}");
    let a3 = format!("127.0.0.3:{p3}");
    let am = format!("127.0.0.100:{pm}");
    let _servers: Vec<Server> = [&a1, &a2, &a3]
        .iter()
        .map(|a| Server::start(Some(&busy), a, &[]))
        .chain([Server::start(Some(&multi), &am, &[])])
        .collect();
    client(Some(&busy), &["--to", &a1, "--count", "3"]);
    client(Some(&busy), &["--to", &a2, "--count", "2"]);
    let netns = busy.inode();
    let series = |key: &str| {
        format!("twtrace_timewait_sockets{{group=\"peer\",key=\"{key}\",netns=\"{netns}\"}}")
    };
    wait_for(
        "the first destination scraped",
        Duration::from_secs(30),
        || !samples(&prom, &series(&a1)).is_empty(),
    );
    client(Some(&busy), &["--to", &a3, "--count", "800"]);
    thread::scope(|s| {
        for src in 11..15 {
            let multi = &multi;
            let am = &am;
            s.spawn(move || {
                client(
                    Some(multi),
                    &[
                        "--to",
                        am,
                        "--count",
                        "150",
                        "--bind",
                        &format!("127.0.0.{src}"),
                    ],
                )
            });
        }
    });
    assert_eq!(busy.sockstat_tw(), 855);
    assert_eq!(multi.sockstat_tw(), 600);

    wait_for(
        "the late destination's series",
        Duration::from_secs(30),
        || {
            samples(&prom, &series(&a3))
                .first()
                .is_some_and(|s| s["value"][1] == "800")
        },
    );
    let ratio = |key: &str, ns: u32| {
        samples(
            &prom,
            &format!("twtrace_peer_port_usage_ratio{{key=\"{key}\",netns=\"{ns}\"}}"),
        )
        .first()
        .and_then(|s| s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()))
    };
    wait_for("both ratios", Duration::from_secs(30), || {
        ratio(&a3, netns).is_some() && ratio(&am, multi.inode()) == Some(0.75)
    });
    assert_eq!(ratio(&a3, netns), Some(800.0 / 900.0));
    let firing = |key: &str| {
        samples(
            &prom,
            &format!(
                "ALERTS{{alertname=\"TwtraceEphemeralPortsLow\",alertstate=\"firing\",key=\"{key}\"}}"
            ),
        )
    };
    wait_for(
        "TwtraceEphemeralPortsLow for the late destination",
        Duration::from_secs(30),
        || !firing(&a3).is_empty(),
    );
    // Several evaluations later, still nothing for the several-source destination.
    thread::sleep(Duration::from_secs(3));
    assert!(firing(&am).is_empty(), "{:?}", firing(&am));
    assert_eq!(ratio(&am, multi.inode()), Some(0.75));
    // No inbound peer has a ratio (their keys are the clients' ports, 40000 to 40899).
    let ours = samples(
        &prom,
        &format!("twtrace_peer_port_usage_ratio{{netns=\"{netns}\"}}"),
    );
    assert!(!ours.is_empty());
    for s in &ours {
        let key: std::net::SocketAddr = s["metric"]["key"].as_str().unwrap().parse().unwrap();
        assert!(!(40000..=40899).contains(&key.port()), "{s}");
    }
    kill_term(serve);
}

fn kill_term(r: Run) -> RunResult {
    // SAFETY: signalling a child of this test.
    unsafe { libc::kill(r.pid() as i32, libc::SIGTERM) };
    let out = r.finish(Duration::from_secs(15));
    assert!(out.status.success(), "{}", out.stderr);
    out
}

/// A raw HTTP exchange: the status line and headers, and the body's bytes.
fn http_raw(addr: &str, request: &str) -> (String, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers");
    (
        String::from_utf8_lossy(&buf[..end]).into_owned(),
        buf[end + 4..].to_vec(),
    )
}

/// HTTP/1.0: the body as sent, never chunked.
fn get10(addr: &str, path: &str, extra: &str) -> (String, Vec<u8>) {
    http_raw(
        addr,
        &format!("GET {path} HTTP/1.0\r\nHost: x\r\n{extra}\r\n"),
    )
}

fn get(addr: &str, path: &str, extra: &str) -> (String, Vec<u8>) {
    http_raw(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n"),
    )
}

/// `--listen :PORT` answers on every address (IPv4 and IPv6 loopback), `GET /` is a page that
/// links the metrics, gzip is used when asked for, `--by`/`--sort` are the API's defaults, a
/// refused query is logged once and scrapes are not.
#[test]
fn serve_keeps_the_exporter_conventions() {
    require_root();
    let _g = shared();
    let port = unique_port();
    let serve = Run::start(
        &[
            "serve",
            "--listen",
            &format!(":{port}"),
            "--by",
            "peer",
            "--sort",
            "births",
        ],
        "serving on",
    );
    let v4 = format!("127.0.0.1:{port}");
    let v6 = format!("[::1]:{port}");
    for addr in [&v4, &v6] {
        let (head, body) = get(addr, "/", "");
        assert!(head.starts_with("HTTP/1.1 200"), "{addr}: {head}");
        assert!(
            head.to_lowercase().contains("content-type: text/html"),
            "{head}"
        );
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("href=\"metrics\""), "{body}");
    }
    // gzip when asked, plain otherwise.
    let (head, body) = get10(&v4, "/metrics", "Accept-Encoding: gzip\r\n");
    assert!(
        head.to_lowercase().contains("content-encoding: gzip"),
        "{head}"
    );
    let mut gunzip = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    gunzip.stdin.take().unwrap().write_all(&body).unwrap();
    let plain = gunzip.wait_with_output().unwrap();
    assert!(plain.status.success());
    assert!(
        String::from_utf8_lossy(&plain.stdout).contains("twtrace_build_info"),
        "gunzipped /metrics"
    );
    let (head, body) = get(&v4, "/metrics", "");
    assert!(!head.to_lowercase().contains("content-encoding"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("twtrace_build_info"));
    // The API's defaults are serve's --by and --sort.
    let (_, body) = get(&v4, "/api/v1/report", "");
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["by"], "peer", "{doc}");
    let (head, _) = get(&v4, "/api/v1/report?port=99999", "");
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let out = kill_term(serve);
    // One line for the refused query, none for the scrapes and pages.
    let logged: Vec<&str> = out.stderr.lines().filter(|l| l.contains("GET ")).collect();
    assert_eq!(logged.len(), 1, "{}", out.stderr);
    assert!(logged[0].starts_with("twtrace: warn: "), "{}", logged[0]);
    assert!(logged[0].contains("'99999'"), "{}", logged[0]);
}

/// `--log-level debug` logs every request, one line each; `error` says nothing but errors.
#[test]
fn serve_log_levels() {
    require_root();
    let _g = shared();
    for (level, lines) in [("debug", 3), ("error", 0)] {
        let listen = format!("127.0.0.1:{}", unique_port());
        let serve = Command::new(twtrace_bin())
            .args(["serve", "--listen", &listen, "--log-level", level])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Whatever it says at start: ready once it answers.
        wait_for("serve answering", Duration::from_secs(20), || {
            http_get(&listen, "/healthz").0 == 200
        });
        let _ = get(&listen, "/metrics", "");
        let _ = get(&listen, "/", "");
        let _ = get(&listen, "/api/v1/report?port=0", "");
        // SAFETY: signalling a child of this test.
        unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
        let out = serve.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        let logged = stderr
            .lines()
            .filter(|l| {
                l.contains("GET /metrics") || l.contains("GET / ") || l.contains("GET /api/")
            })
            .count();
        assert_eq!(logged, lines, "{level}: {stderr}");
        if level == "error" {
            assert!(
                !stderr.contains("serving on") && !stderr.contains("events lost"),
                "{stderr}"
            );
        }
    }
}

/// A port in use is not bad usage: exit 8, which the systemd unit does not keep from
/// restarting, and nothing was attached.
#[test]
fn a_busy_port_exits_8_and_is_restarted() {
    require_root();
    let _g = exclusive();
    let before = quiet_programs();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(twtrace_bin())
        .args(["serve", "--listen", &addr])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // EADDRINUSE in the C library's words: glibc's "Address already in use", musl's (the
    // static binary that ships) "Address in use".
    assert!(
        stderr.contains(&format!("cannot listen on {addr}: Address "))
            && stderr.contains("in use (os error 98)"),
        "{stderr}"
    );
    assert_eq!(settled_programs(before), before);
    // That the unit restarts it: deploy_systemd::systemd_unit_restarts_serve_on_a_busy_port.
}
