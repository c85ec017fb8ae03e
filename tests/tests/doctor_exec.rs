//! `twtrace doctor` and `twtrace exec` against real traffic and the kernel's own settings.

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use twtrace_tests::*;

/// Sets a sysctl for the test and puts the old value back on drop (also on panic).
struct Sysctl {
    path: String,
    old: String,
}

impl Sysctl {
    fn set(name: &str, value: &str) -> Self {
        let path = format!("/proc/sys/{}", name.replace('.', "/"));
        let old = std::fs::read_to_string(&path).unwrap();
        write_all(&path, value);
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        write_all(&self.path, &self.old);
    }
}

fn doctor(duration: &str) -> Run {
    Run::start(&["doctor", "--duration", duration, "--json"], "watching")
}

/// The interval of the exact values that print as `printed` rounded to `step` (0.1, 1).
fn unrounded(printed: f64, step: f64) -> (f64, f64) {
    (printed - step / 2.0, printed + step / 2.0)
}

/// `printed` is `f(x)` rounded to `step` for some `x` in `[lo, hi]` (`f` monotonic).
fn rounds_from(printed: f64, step: f64, (lo, hi): (f64, f64), f: impl Fn(f64) -> f64) -> bool {
    let (a, b) = (f(lo).min(f(hi)), f(lo).max(f(hi)));
    let (p_lo, p_hi) = unrounded(printed, step);
    const EPS: f64 = 1e-9;
    p_lo <= b + EPS && a <= p_hi + EPS
}

fn findings(doc: &Value, kind: &str) -> Vec<Value> {
    doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == kind)
        .cloned()
        .collect()
}

/// A known rate of new connections to one loopback peer, with a narrowed port range: doctor
/// names that destination, with the kernel's numbers.
#[test]
fn doctor_reports_port_exhaustion_for_the_destination_with_its_numbers() {
    require_root();
    let _g = exclusive();
    let _range = Sysctl::set("net.ipv4.ip_local_port_range", "40000 40999");
    // No reuse: every connection keeps its own port for the whole 60 s, so held == made.
    let _reuse = Sysctl::set("net.ipv4.tcp_tw_reuse", "0");
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &[]);
    let d = doctor(UNTIL_INTERRUPTED);
    let run = client(None, &["--to", &addr, "--count", "300", "--rate", "50"]);
    assert_eq!(run.local_ports.len(), 300);
    // The window closes once the kernel holds the 300 TIME_WAIT, however long they took.
    assert_eq!(wait_for(300, || ss_time_wait(None, port).len()), 300);
    let r = d.interrupt(Duration::from_secs(30));
    assert_eq!(r.status.code(), Some(9), "serious finding: {}", r.stderr);
    let doc: Value = serde_json::from_str(&r.stdout).unwrap();
    // Other destinations may hold a few ports (earlier tests); ours is the serious one.
    let f: Vec<Value> = findings(&doc, "port_exhaustion")
        .into_iter()
        .filter(|f| f["severity"] != "info")
        .collect();
    assert_eq!(f.len(), 1, "exactly that destination: {doc}");
    let data = &f[0]["data"];
    assert_eq!(data["destination"], addr.as_str());
    assert_eq!(data["source"], "127.0.0.1");
    assert_eq!(data["usable_ports"], 1000);
    assert_eq!(data["births"], 300);
    assert_eq!(data["held"], 300);
    assert_eq!(data["in_time_wait"], 300);
    assert_eq!(data["tw_reuse_applies"], false);
    // doctor's arithmetic, from what it printed: the rate is the births over the seconds its
    // traffic ran in the window (`rate_over_s`: from about one gap before the first birth to
    // the window's end, at least half the window; both printed to 0.1), the steady state that
    // rate x 60 s of TIME_WAIT, the time left the free ports over that rate (both printed to
    // 1 s).
    let (duration, over, rate) = (
        doc["duration_s"].as_f64().unwrap(),
        data["rate_over_s"].as_f64().unwrap(),
        data["rate_per_s"].as_f64().unwrap(),
    );
    // The client ran for 6 s (300 at 50/s) of a window that began before it and ended after.
    assert!(
        (duration / 2.0 - 0.05..=duration + 0.05).contains(&over) && over >= 5.9,
        "{over} s of {duration} s"
    );
    let (o_lo, o_hi) = unrounded(over, 0.1);
    let (r_lo, r_hi) = unrounded(rate, 0.1);
    // The exact rate: births / the exact span, which also prints as `rate`.
    let exact = (r_lo.max(300.0 / o_hi), r_hi.min(300.0 / o_lo));
    assert!(
        exact.0 <= exact.1,
        "{rate}/s is not 300 births over {over} s"
    );
    let steady = data["steady_state"].as_f64().unwrap();
    assert!(
        rounds_from(steady, 1.0, exact, |r| r * 60.0),
        "{steady} vs {rate} x 60"
    );
    let left = data["time_left_s"].as_f64().unwrap();
    assert!(
        rounds_from(left, 1.0, exact, |r| (1000.0 - 300.0) / r),
        "{left} vs 700 / {rate}"
    );
    assert_eq!(f[0]["severity"], "critical");
}

#[test]
fn doctor_on_a_quiet_host_finds_nothing_serious() {
    require_root();
    let _g = exclusive();
    let r = doctor("2s").finish(Duration::from_secs(20));
    assert_eq!(r.status.code(), Some(0), "{}\n{}", r.stdout, r.stderr);
    let doc: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["serious"], 0, "{doc}");
}

/// A process that accepts and never closes: its CLOSE_WAIT grows, doctor names it.
#[test]
fn doctor_names_the_process_that_never_closes() {
    require_root();
    let _g = exclusive();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server::start(None, &addr, &["--hold", "--name", "twt-leaky"]);
    let d = doctor(UNTIL_INTERRUPTED);
    client(None, &["--to", &addr, "--count", "20", "--hold"]);
    let close_wait = || {
        run(Command::new("ss").args(["-Htan", "state", "close-wait", &format!("sport = :{port}")]))
            .lines()
            .count()
    };
    assert_eq!(wait_for(20, close_wait), 20);
    let r = d.interrupt(Duration::from_secs(20));
    let doc: Value = serde_json::from_str(&r.stdout).unwrap();
    let f: Vec<Value> = findings(&doc, "close_wait")
        .into_iter()
        .filter(|f| f["data"]["pid"] == server.pid)
        .collect();
    assert_eq!(f.len(), 1, "{doc}");
    assert_eq!(f[0]["data"]["comm"], "twt-leaky");
    assert_eq!(f[0]["data"]["sockets"], 20);
    assert_eq!(f[0]["data"]["grew"], 20);
    assert_eq!(f[0]["severity"], "warning");
    assert!(
        f[0]["title"]
            .as_str()
            .unwrap()
            .contains(&format!("twt-leaky[{}]", server.pid))
    );
    assert_eq!(r.status.code(), Some(9));
}

fn exec_json(args: &[&str]) -> (Option<i32>, Value) {
    let out = Command::new(twtrace_bin())
        .arg("exec")
        .arg("--json")
        .args(args)
        .output()
        .expect("twtrace exec");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    let v = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    (out.status.code(), v)
}

/// A child making 50 short connections busts a budget of 10, counted exactly, while another
/// process's traffic at the same time is not counted; reusing one connection passes.
#[test]
fn exec_charges_the_command_tree_and_enforces_budgets() {
    require_root();
    let _g = shared();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &[]);
    let churn = churn_bin();
    let churn = churn.to_str().unwrap();

    // Someone else churns to the same server during the run.
    let other_addr = addr.clone();
    let other = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        client(
            None,
            &["--to", &other_addr, "--count", "30", "--rate", "100"],
        )
    });
    let (code, v) = exec_json(&[
        "--max-timewait",
        "10",
        "--",
        churn,
        "client",
        "--to",
        &addr,
        "--count",
        "50",
        "--rate",
        "50",
    ]);
    other.join().unwrap();
    assert_eq!(code, Some(124), "{v}");
    assert_eq!(v["births"], 50, "{v}");
    assert_eq!(v["exit_code"], 0);
    assert_eq!(v["by_peer"][0]["key"], addr.as_str());
    assert_eq!(v["by_peer"][0]["births"], 50);
    assert!(
        v["budgets"]["exceeded"][0]
            .as_str()
            .unwrap()
            .contains("--max-timewait 10")
    );

    // Children of children count too, from their first connection.
    let script = format!(
        "{churn} client --to {addr} --count 7 & {churn} client --to {addr} --count 5; wait"
    );
    let (code, v) = exec_json(&["--", "sh", "-c", &script]);
    assert_eq!(code, Some(0));
    assert_eq!(v["births"], 12, "{v}");

    // The same work over one kept-alive connection stays within budget.
    let (code, v) = exec_json(&[
        "--max-timewait",
        "10",
        "--",
        churn,
        "client",
        "--to",
        &addr,
        "--count",
        "50",
        "--keepalive",
    ]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["births"], 1);

    // The command's own exit code comes through.
    let (code, _) = exec_json(&["--", "sh", "-c", "exit 7"]);
    assert_eq!(code, Some(7));
}

/// doctor restricted to one namespace of the test's own, so that no other traffic counts.
fn doctor_in(ns: &Netns, duration: &str) -> Run {
    Run::start(
        &[
            "doctor",
            "--duration",
            duration,
            "--json",
            "--netns",
            &ns.name,
        ],
        "watching",
    )
}

/// The README's own example (field case 06): tcp_tw_reuse=2 on loopback, timestamps on, a
/// client at 60 connections/s through 200 ports: connect() takes over TIME_WAIT older than a
/// second, TcpExt TWRecycled grows, no connect() fails; doctor predicts no failure and says why.
#[test]
fn doctor_knows_reuse_on_loopback_recycles_ports() {
    require_root();
    let _g = shared();
    let ns = Netns::new("reuse");
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40199");
    ns.sysctl("net.ipv4.tcp_tw_reuse", "2");
    let port = unique_port();
    let addr = format!("127.0.0.2:{port}");
    let _server = Server::start(Some(&ns), &addr, &[]);
    let before = ns.tcpext()["TWRecycled"];
    let d = doctor_in(&ns, UNTIL_INTERRUPTED);
    let run = client(
        Some(&ns),
        &[
            "--to",
            &addr,
            "--count",
            "480",
            "--rate",
            "60",
            "--tolerate-errors",
        ],
    );
    let r = d.interrupt(Duration::from_secs(30));
    let recycled = ns.tcpext()["TWRecycled"] - before;
    assert!(
        run.errors.is_empty(),
        "no connect() failed: {:?}",
        run.errors
    );
    assert!(recycled > 200, "the kernel took TIME_WAIT over: {recycled}");
    let doc: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(r.status.code(), Some(0), "nothing serious: {doc}");
    let f = findings(&doc, "port_exhaustion");
    assert_eq!(f.len(), 1, "{doc}");
    let data = &f[0]["data"];
    assert_eq!(data["destination"], addr.as_str());
    assert_eq!(data["tw_reuse_applies"], true);
    assert!(
        data["time_left_s"].is_null(),
        "no failure predicted: {data}"
    );
    assert_eq!(data["tw_reuse_delay_ms"], 1000);
    let needed = data["steady_state"].as_f64().unwrap();
    assert!(needed <= 70.0, "about a second of connections: {needed}");
    assert_eq!(f[0]["severity"], "info");
}

/// A client that binds its source address (port 0) before each connect(), towards two
/// destinations, 10 connections/s through 100 ports (field case 16): the ports are the source
/// address's whatever the destination and TIME_WAIT keeps them. doctor judges that one pool,
/// critical, names the remedy, and its predicted failure comes when bind() starts failing.
#[test]
fn doctor_models_bind_before_connect_per_source_address() {
    require_root();
    let _g = shared();
    let ns = Netns::new("bind");
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40099");
    let (p1, p2) = (unique_port(), unique_port());
    let (a1, a2) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
    let _s1 = Server::start(Some(&ns), &a1, &[]);
    let _s2 = Server::start(Some(&ns), &a2, &[]);
    let d = doctor_in(&ns, "5s");
    let started = Instant::now();
    let started_at = monotonic_s();
    let (r, watched_s, runs) = thread::scope(|s| {
        let bound = |to: &str| {
            let to = to.to_owned();
            let ns = &ns;
            s.spawn(move || {
                client(
                    Some(ns),
                    &[
                        "--to",
                        &to,
                        "--count",
                        "80",
                        "--rate",
                        "5",
                        "--bind",
                        "127.0.0.1",
                        "--tolerate-errors",
                    ],
                )
            })
        };
        let (c1, c2) = (bound(&a1), bound(&a2));
        let r = d.finish(Duration::from_secs(30));
        let watched_s = started.elapsed().as_secs_f64();
        (r, watched_s, [c1.join().unwrap(), c2.join().unwrap()])
    });
    let doc: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(r.status.code(), Some(9), "{doc}");
    let f: Vec<Value> = findings(&doc, "port_exhaustion")
        .into_iter()
        .filter(|f| f["data"]["allocation"] == "bind")
        .collect();
    assert_eq!(f.len(), 1, "{doc}");
    let data = &f[0]["data"];
    assert_eq!(f[0]["severity"], "critical");
    assert_eq!(data["source"], "127.0.0.1");
    assert!(data["destination"].is_null());
    assert_eq!(data["usable_ports"], 100);
    assert_eq!(data["tw_reuse_applies"], false);
    assert!(
        f[0]["remedy"]
            .as_str()
            .unwrap()
            .contains("IP_BIND_ADDRESS_NO_PORT")
    );
    // The per-destination pools of a binding source say nothing more.
    assert!(
        findings(&doc, "port_exhaustion")
            .iter()
            .all(|f| f["data"]["allocation"] == "bind"),
        "{doc}"
    );
    // What happened: bind() ran out of ports (EADDRINUSE) when the model said.
    let actual = runs
        .iter()
        .filter_map(|r| r.first_error_at)
        .fold(f64::INFINITY, f64::min)
        - started_at;
    assert!(actual.is_finite(), "bind() failed: {runs:?}");
    assert!(
        runs.iter()
            .all(|r| r.errors.keys().all(|k| k == "EADDRINUSE")),
        "{runs:?}"
    );
    assert_prediction(
        doc["duration_s"].as_f64().unwrap(),
        watched_s,
        data["time_left_s"].as_f64().unwrap(),
        actual,
    );
}

/// connect() already failing for lack of a port while doctor watches: the finding carries the
/// failures that happened, as many as the client counted, and who called connect().
#[test]
fn doctor_carries_the_failures_that_happen() {
    require_root();
    let _g = shared();
    let ns = Netns::new("failing");
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40099");
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(Some(&ns), &addr, &[]);
    let d = doctor_in(&ns, UNTIL_INTERRUPTED);
    let run = client(
        Some(&ns),
        &[
            "--to",
            &addr,
            "--count",
            "200",
            "--rate",
            "50",
            "--tolerate-errors",
        ],
    );
    assert_eq!(wait_for(100, || ns.sockstat_tw()), 100);
    let r = d.interrupt(Duration::from_secs(30));
    assert_eq!(run.local_ports.len(), 100);
    assert_eq!(run.errors.get("EADDRNOTAVAIL"), Some(&100));
    let doc: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(r.status.code(), Some(9));
    let f = findings(&doc, "port_exhaustion");
    assert_eq!(f.len(), 1, "{doc}");
    let data = &f[0]["data"];
    assert_eq!(f[0]["severity"], "critical");
    assert_eq!(data["no_port_failures"], 100);
    assert_eq!(data["failing"][0]["pid"], run.pid);
    assert_eq!(data["failing"][0]["count"], 100);
    assert_eq!(data["time_left_s"], 0.0);
    assert!(
        f[0]["evidence"].as_array().unwrap().iter().any(|e| e
            .as_str()
            .unwrap()
            .starts_with("already failing: 100 connect() calls")),
        "{}",
        f[0]["evidence"]
    );
}

/// A server that stopped calling accept(): clients that gave up leave CLOSE_WAIT in its accept
/// queue, held by no process (field case 09). doctor names the listening port and the process
/// that owns the listener, and says it is not accepting, not that it forgot close().
#[test]
fn doctor_names_a_listener_that_stopped_accepting() {
    require_root();
    let _g = shared();
    let ns = Netns::new("noaccept");
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server::start(Some(&ns), &addr, &["--no-accept"]);
    let d = doctor_in(&ns, UNTIL_INTERRUPTED);
    client(Some(&ns), &["--to", &addr, "--count", "30", "--hold"]);
    let in_queue = || {
        ns.exec_ok(&[
            "ss",
            "-Htan",
            "state",
            "close-wait",
            &format!("sport = :{port}"),
        ])
        .lines()
        .count()
    };
    assert_eq!(wait_for(30, in_queue), 30);
    let r = d.interrupt(Duration::from_secs(30));
    let doc: Value = serde_json::from_str(&r.stdout).unwrap();
    let f = findings(&doc, "close_wait");
    assert_eq!(f.len(), 1, "{doc}");
    assert_eq!(f[0]["data"]["pid"], server.pid);
    assert_eq!(f[0]["data"]["listener_port"], port);
    assert_eq!(f[0]["data"]["sockets"], 30);
    assert_eq!(
        f[0]["title"],
        format!(
            "twt-churn[{}] is not accepting connections on port {port}",
            server.pid
        )
    );
    assert!(
        f[0]["remedy"]
            .as_str()
            .unwrap()
            .contains("not a missing close()")
    );
}
