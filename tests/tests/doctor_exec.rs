//! `twtrace doctor` and `twtrace exec` against real traffic and the kernel's own settings.

use std::{process::Command, thread, time::Duration};

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
    let d = doctor("8s");
    let run = client(None, &["--to", &addr, "--count", "300", "--rate", "50"]);
    assert_eq!(run.local_ports.len(), 300);
    let r = d.finish(Duration::from_secs(30));
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
    let duration = doc["duration_s"].as_f64().unwrap();
    let rate = data["rate_per_s"].as_f64().unwrap();
    assert!(
        (rate - 300.0 / duration).abs() < 0.1,
        "{rate} vs {duration}"
    );
    let steady = data["steady_state"].as_f64().unwrap();
    assert!((steady - rate * 60.0).abs() <= 1.0);
    let left = data["time_left_s"].as_f64().unwrap();
    assert!((left - (1000.0 - 300.0) / rate).abs() <= 1.0, "{left}");
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
    let d = doctor("4s");
    client(None, &["--to", &addr, "--count", "20", "--hold"]);
    let r = d.finish(Duration::from_secs(20));
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
