//! `twtrace report` against real peers: network namespaces joined by veth pairs, servers in
//! each, client processes with known names making known numbers of connections.

use std::{
    collections::BTreeMap,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use serde_json::Value;
use twtrace_tests::*;

fn groups(doc: &Value) -> BTreeMap<String, Value> {
    doc["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| (g["key"].as_str().unwrap().to_owned(), g.clone()))
        .collect()
}

fn report_json(r: RunResult) -> Value {
    assert!(r.status.success(), "report failed: {}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

/// Three peers, each a namespace of its own with a server; two client processes with
/// different names make different, known numbers of connections to them.
#[test]
fn report_by_peer_and_by_process_gives_exact_counts() {
    require_root();
    let _g = shared();
    let clients = Netns::new("rc");
    let servers: Vec<Netns> = (0..3).map(|i| Netns::new(&format!("rs{i}"))).collect();
    let net = 100 + (std::process::id() % 100) as u8;
    for (i, s) in servers.iter().enumerate() {
        clients.link(
            s,
            &format!("10.{net}.{}.1", i + 1),
            &format!("10.{net}.{}.2", i + 1),
        );
    }
    let port = unique_port();
    let peer = |i: usize| format!("10.{net}.{}.2:{port}", i + 1);
    let _servers: Vec<Server> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| Server::start(Some(s), &peer(i), &[]))
        .collect();

    let filter = format!("10.{net}.0.0/16");
    let common = [
        "--duration",
        UNTIL_INTERRUPTED,
        "--json",
        "--peer",
        &filter,
        "--top",
        "50",
    ];
    let by_peer = Run::start(
        &[&["report", "--by", "peer"][..], &common[..]].concat(),
        "collecting",
    );
    let by_process = Run::start(
        &[&["report", "--by", "process"][..], &common[..]].concat(),
        "collecting",
    );

    // Client A: 3, 5 and 7 connections to the three peers; client B: 6 to the second.
    let mut a_pids = Vec::new();
    for (i, n) in [(0, 3), (1, 5), (2, 7)] {
        let run = client(
            Some(&clients),
            &[
                "--to",
                &peer(i),
                "--count",
                &n.to_string(),
                "--name",
                "twt-client-a",
            ],
        );
        a_pids.push(run.pid);
    }
    let b = client(
        Some(&clients),
        &["--to", &peer(1), "--count", "6", "--name", "twt-client-b"],
    );
    assert_eq!(
        wait_for(3 + 5 + 7 + 6, || clients.sockstat_tw()),
        3 + 5 + 7 + 6,
        "the kernel's own count"
    );

    let doc = report_json(by_peer.interrupt(Duration::from_secs(30)));
    assert_eq!(doc["by"], "peer");
    assert_eq!(doc["totals"]["entered"], 21);
    assert_eq!(doc["totals"]["lost_events"], 0);
    let g = groups(&doc);
    assert_eq!(g.len(), 3, "{g:?}");
    for (i, n) in [(0, 3), (1, 11), (2, 7)] {
        let grp = &g[&peer(i)];
        assert_eq!(grp["entered"], n, "{grp}");
        assert_eq!(grp["in_time_wait"], n, "{grp}");
        assert_eq!(grp["exited"], 0);
        assert_eq!(grp["by"], "peer");
        // A 6 s run has no 10 s or 60 s rate yet (a window longer than the run is null).
        assert!(grp["rates"]["60s"].is_null(), "{grp}");
        assert!(grp["rates"]["10s"].is_null(), "{grp}");
    }
    let second: Vec<&str> = g[&peer(1)]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["comm"].as_str().unwrap())
        .collect();
    assert!(second.contains(&"twt-client-a") && second.contains(&"twt-client-b"));

    // Each client run is a process of its own: A's three runs and B's one.
    let doc = report_json(by_process.interrupt(Duration::from_secs(30)));
    let g = groups(&doc);
    for (pid, n) in a_pids.iter().zip([3, 5, 7]) {
        let key = format!("twt-client-a[{pid}]");
        assert_eq!(g[&key]["entered"], n, "{key}: {g:?}");
    }
    assert_eq!(g[&format!("twt-client-b[{}]", b.pid)]["entered"], 6);
    assert_eq!(g.len(), 4, "{g:?}");
}

/// Started while TIME_WAIT sockets already exist: they are counted from the first second,
/// with their owner unknown.
#[test]
fn report_counts_time_wait_that_existed_before_it_started() {
    require_root();
    let _g = shared();
    const K: u64 = 13;
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &[]);
    client(None, &["--to", &addr, "--count", &K.to_string()]);
    let r = Run::start(
        &[
            "report",
            "--duration",
            "2s",
            "--json",
            "--port",
            &port.to_string(),
            "--by",
            "process",
        ],
        "collecting",
    );
    let doc = report_json(r.finish(Duration::from_secs(20)));
    assert_eq!(doc["totals"]["in_time_wait"], K, "{doc}");
    assert_eq!(doc["totals"]["seeded"], K);
    assert_eq!(
        doc["totals"]["entered"], 0,
        "they were not born during the report"
    );
    let g = groups(&doc);
    assert_eq!(g["(before start)"]["in_time_wait"], K, "{g:?}");
}

/// A script running a short-lived client again and again (field case 21: curl in a loop): each
/// run is a new process. `--by process` shows the top rows and sums the rest in `other`, so
/// that nothing goes missing; `--by comm` puts them under one name.
#[test]
fn short_lived_processes_add_up_by_comm_and_in_other() {
    require_root();
    let _g = shared();
    let ns = Netns::new("loop");
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(Some(&ns), &addr, &[]);
    let args = |by: &'static str| {
        vec![
            "report".to_owned(),
            "--json".into(),
            "--duration".into(),
            UNTIL_INTERRUPTED.into(),
            "--netns".into(),
            ns.name.clone(),
            "--by".into(),
            by.into(),
            "--top".into(),
            "5".into(),
        ]
    };
    let start = |by| {
        let a = args(by);
        Run::start(
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            "collecting",
        )
    };
    let (by_process, by_comm) = (start("process"), start("comm"));
    let mut pids = Vec::new();
    for _ in 0..12 {
        pids.push(
            client(
                Some(&ns),
                &["--to", &addr, "--count", "1", "--name", "probe"],
            )
            .pid,
        );
    }
    assert_eq!(wait_for(12, || ns.sockstat_tw()), 12);
    let p = report_json(by_process.interrupt(Duration::from_secs(30)));
    let c = report_json(by_comm.interrupt(Duration::from_secs(30)));
    assert_eq!(p["groups"].as_array().unwrap().len(), 5, "{p}");
    assert_eq!(p["other"]["entered"], 12 - 5, "the rest, summed: {p}");
    assert_eq!(p["groups_total"], 12);
    let rows: u64 = p["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["entered"].as_u64().unwrap())
        .sum();
    assert_eq!(rows + p["other"]["entered"].as_u64().unwrap(), 12);
    let g = groups(&c);
    assert_eq!(g.len(), 1, "{c}");
    assert_eq!(g["probe"]["entered"], 12);
    let seen: Vec<u64> = g["probe"]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["pid"].as_u64().unwrap())
        .collect();
    // The group remembers its most recent owners (8 at most), newest first.
    let newest: Vec<u64> = pids.iter().rev().take(8).map(|&p| p as u64).collect();
    assert_eq!(seen, newest);
    assert!(c["other"].is_null());
}

/// The window's last moments count: with connections still being made when `--duration` ends,
/// the report reads everything the kernel emitted in its window. The programs are detached when
/// the window closes and the ring read until it holds every record the kernel counted as
/// emitted, so `--stats-json` shows `received` equal to the kernel's `emitted` and nothing lost.
/// (Before, one last read left the records of the last moments in the ring, and the programs,
/// still attached, went on emitting while the report was printed.)
#[test]
fn report_reads_everything_its_window_emitted_while_traffic_goes_on() {
    require_root();
    let _g = shared();
    let ns = Netns::new("drn");
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(Some(&ns), &addr, &[]);
    let stats = std::env::temp_dir().join(format!("twt-drn-{}.json", std::process::id()));
    let report = Run::start(
        &[
            "report",
            "--json",
            "--duration",
            "2s",
            "--netns",
            &ns.name,
            "--stats-json",
            stats.to_str().unwrap(),
        ],
        "collecting",
    );
    let done = AtomicBool::new(false);
    let (r, made) = thread::scope(|s| {
        let traffic = s.spawn(|| {
            let mut made = 0;
            while !done.load(Ordering::Relaxed) {
                made += client(Some(&ns), &["--to", &addr, "--count", "20"])
                    .local_ports
                    .len();
            }
            made
        });
        let r = report.finish(Duration::from_secs(60));
        done.store(true, Ordering::Relaxed);
        (r, traffic.join().unwrap())
    });
    let doc = report_json(r);
    let s: Value = serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    let _ = std::fs::remove_file(&stats);
    let entered = doc["totals"]["entered"].as_u64().unwrap();
    assert!(entered > 0 && entered <= made as u64, "{entered} of {made}");
    assert_eq!(s["kernel"]["lost"], 0, "{s}");
    assert_eq!(
        s["received"], s["kernel"]["emitted"],
        "every record the window emitted was read: {s}"
    );
    assert_eq!(doc["totals"]["lost_events"], 0);
}
