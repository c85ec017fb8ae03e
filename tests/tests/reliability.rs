//! twtrace must never be what breaks: bad environments get one clear line and a documented exit
//! code, every way of ending leaves nothing in the kernel, overload is counted exactly, and the
//! kernel's owner map forgets sockets that end badly.

use std::{
    process::{Command, Output},
    thread,
    time::Duration,
};

use serde_json::Value;
use twtrace_tests::*;

fn twtrace_in(shell_prefix: &str, args: &str) -> Output {
    let cmd = format!("{shell_prefix} {} {args}", twtrace_bin().display());
    Command::new("sh").arg("-c").arg(cmd).output().expect("sh")
}

/// One line on stderr, starting with `twtrace: ` and containing `needle`, and `code`.
fn assert_one_line(out: &Output, code: i32, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("twtrace: ") && stderr.contains(needle),
        "{stderr}"
    );
}

/// Without tracefs, and unable to mount it: every program is a BTF tracepoint, `exec`'s fork
/// tracking included, so every command works, and none mounts tracefs.
#[test]
fn tracefs_neither_mounted_nor_mountable() {
    require_root();
    let _g = exclusive();
    let before = quiet_programs();
    let no_tracefs = "unshare -m --propagation private sh -c 'umount -l /sys/kernel/tracing \
         2>/dev/null; exec setpriv --bounding-set=-sys_admin --inh-caps=-sys_admin \"$0\" \"$@\"'";
    let out = twtrace_in(no_tracefs, "watch --duration 1s");
    assert!(
        out.status.success(),
        "watch needs no tracefs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The command and its child, forked after the start, are followed without tracefs.
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &[]);
    let client = format!(
        "exec --json -- sh -c '{} client --to {addr} --count 3'",
        churn_bin().display()
    );
    let out = twtrace_in(no_tracefs, &client);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let summary: Value = serde_json::from_str(stderr.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(summary["births"], 3, "{summary}");
    assert!(!stderr.contains("mounted tracefs"), "{stderr}");
    assert_eq!(settled_programs(before), before);
}

#[test]
fn btf_missing() {
    require_root();
    let _g = shared();
    let out = twtrace_in(
        "unshare -m --propagation private sh -c 'mount -t tmpfs none /sys/kernel/btf && exec \"$0\" \"$@\"'",
        "watch --duration 1s",
    );
    assert_one_line(&out, 5, "BTF missing");
    assert!(String::from_utf8_lossy(&out.stderr).contains("CONFIG_DEBUG_INFO_BTF"));
}

#[test]
fn kallsyms_hiding_addresses() {
    require_root();
    let _g = exclusive();
    let before = quiet_programs();
    let old = std::fs::read_to_string("/proc/sys/kernel/kptr_restrict").unwrap();
    write_all("/proc/sys/kernel/kptr_restrict", "2");
    let out = twtrace_in("", "watch --duration 1s");
    write_all("/proc/sys/kernel/kptr_restrict", &old);
    assert_one_line(&out, 5, "kptr_restrict = 2");
    assert_eq!(settled_programs(before), before);
}

#[test]
fn ring_buffer_refused_by_the_kernel() {
    require_root();
    let _g = exclusive();
    let before = quiet_programs();
    let (prefix, cleanup): (String, Box<dyn Fn()>) = if kernel_version() < (5, 11) {
        // Before 5.11 BPF memory is charged to RLIMIT_MEMLOCK, not to the cgroup, and
        // twtrace raises that limit: a low one it cannot raise (no CAP_SYS_RESOURCE).
        (
            "sh -c 'ulimit -l 1024 && exec setpriv --bounding-set -sys_resource \"$0\" \"$@\"'"
                .to_owned(),
            Box::new(|| {}),
        )
    } else {
        // A memory cgroup too small for the ring buffer: the kernel refuses the map. Its
        // limit is v1's memory controller's, or (cgroup v2 only) the unified hierarchy's.
        let pid = std::process::id();
        let (cg, limit) = if std::path::Path::new("/sys/fs/cgroup/memory").is_dir() {
            (
                format!("/sys/fs/cgroup/memory/twt-ring-{pid}"),
                "memory.limit_in_bytes",
            )
        } else {
            (format!("/sys/fs/cgroup/twt-ring-{pid}"), "memory.max")
        };
        std::fs::create_dir_all(&cg).unwrap();
        write_all(&format!("{cg}/{limit}"), "64M");
        let c = cg.clone();
        (
            format!("sh -c 'echo $$ > {cg}/cgroup.procs && exec \"$0\" \"$@\"'"),
            Box::new(move || {
                let _ = std::fs::remove_dir(&c);
            }),
        )
    };
    let out = twtrace_in(&prefix, "watch --duration 1s --ring-size 256MiB");
    thread::sleep(Duration::from_millis(100));
    cleanup();
    assert_one_line(&out, 7, "the kernel refused to create twtrace's maps");
    // The size as it was typed.
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ring-size (now 256MiB)"));
    assert_eq!(settled_programs(before), before);
}

#[test]
fn two_instances_at_once_both_see_everything() {
    require_root();
    let _g = shared();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let a = Watch::start(&["--port", &port.to_string()]);
    let b = Watch::start(&["--port", &port.to_string()]);
    let _server = Server::start(None, &addr, &[]);
    let run = client(None, &["--to", &addr, "--count", "11"]);
    for w in [a, b] {
        let mut seen = Vec::new();
        w.wait_until(Duration::from_secs(10), &mut seen, |e| {
            e.iter().filter(|e| e["event"] == "tw_enter").count() >= 11
        });
        let r = w.stop_with(libc::SIGINT, seen);
        let births: Vec<&Value> = r.of_kind("tw_enter").collect();
        assert_eq!(births.len(), 11);
        assert!(births.iter().all(|b| b["pid"] == run.pid));
    }
}

#[test]
fn bad_values_are_named_and_exit_2() {
    for (args, needle) in [
        ("watch --port 70000", "'70000'"),
        ("watch --port http", "'http'"),
        ("watch --peer 10.0.0.1/8", "did you mean 10.0.0.0/8"),
        ("watch --peer 300.1.1.1", "'300.1.1.1'"),
        ("watch --duration 10x", "'10x'"),
        ("watch --ring-size 3MiB", "'3MiB'"),
        ("report --by host", "'host'"),
        ("report --top 0", "'0'"),
        ("serve --listen 127.0.0.1", "'127.0.0.1'"),
        ("serve --max-series many", "'many'"),
        ("watch --ring-size 1GiB", "'1GiB'"),
        ("watch --comm a-name-longer-than-15", "longer than 15"),
        ("watch -4 -6", "cannot be used with"),
        // exec's own failures stand apart from its command's codes: 125.
        ("exec --max-timewait -1 -- true", "'-1'"),
        ("exec --max-rate 0 -- true", "'0'"),
    ] {
        let out = Command::new(twtrace_bin())
            .args(args.split_whitespace())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let code = if args.starts_with("exec ") { 125 } else { 2 };
        assert_eq!(out.status.code(), Some(code), "{args}: {stderr}");
        assert!(stderr.contains(needle), "{args}: {stderr}");
    }
}

/// Normal exit, SIGINT, SIGKILL, a panic, an error halfway through attaching: nothing stays.
#[test]
fn nothing_left_in_the_kernel_after_any_end() {
    require_root();
    let _g = exclusive();
    let before = quiet_programs();

    let out = twtrace_in("", "watch --duration 1s");
    assert!(out.status.success());
    assert_eq!(settled_programs(before), before, "after a normal exit");

    for signal in [libc::SIGINT, libc::SIGKILL] {
        let w = Watch::start(&[]);
        assert_eq!(twtrace_programs_loaded(), before + 4);
        let r = w.stop_with(signal, Vec::new());
        if signal == libc::SIGINT {
            assert!(r.status.success());
        }
        assert_eq!(settled_programs(before), before, "after signal {signal}");
    }

    let out = Command::new(twtrace_bin())
        .args(["watch", "--duration", "1s"])
        .env("TWTRACE_TEST_PANIC", "after-attach")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(101), "the injected panic happened");
    assert_eq!(settled_programs(before), before, "after a panic");

    // The third program fails to attach after two were attached.
    let out = Command::new(twtrace_bin())
        .args(["watch", "--duration", "1s"])
        .env("TWTRACE_TEST_FAIL_ATTACH", "timer_cancel")
        .output()
        .unwrap();
    assert_one_line(&out, 7, "attach to BTF tracepoint timer_cancel");
    assert_eq!(settled_programs(before), before, "after a failed attach");
}

fn stats(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A deliberately tiny ring buffer under heavy churn: every lost event is counted, the views
/// say so, and what was received is exactly what the kernel submitted.
#[test]
fn overload_is_counted_exactly_and_reported() {
    require_root();
    let _g = exclusive();
    let ns = Netns::new("ovl");
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let dir = std::env::temp_dir();
    let watch_stats = dir.join(format!("twt-ovl-watch-{}.json", std::process::id()));
    let report_stats = dir.join(format!("twt-ovl-report-{}.json", std::process::id()));
    let watch = Run::start(
        &[
            "watch",
            "--json",
            "--ring-size",
            "4096",
            "--stats-json",
            watch_stats.to_str().unwrap(),
        ],
        "tracing TIME_WAIT",
    );
    let report = Run::start(
        &[
            "report",
            "--json",
            "--duration",
            "6s",
            "--ring-size",
            "4096",
            "--stats-json",
            report_stats.to_str().unwrap(),
        ],
        "collecting",
    );
    let _server = Server::start(Some(&ns), &addr, &[]);
    // The readers are stopped while the load runs: the 4 KiB rings must overflow, whatever the
    // machine's speed. They catch up once continued.
    // SAFETY: signalling our own children.
    unsafe {
        libc::kill(watch.pid() as i32, libc::SIGSTOP);
        libc::kill(report.pid() as i32, libc::SIGSTOP);
    }
    thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| client(Some(&ns), &["--to", &addr, "--count", "2000"]));
        }
    });
    // SAFETY: as above.
    unsafe {
        libc::kill(watch.pid() as i32, libc::SIGCONT);
        libc::kill(report.pid() as i32, libc::SIGCONT);
    }
    thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(watch.pid() as i32, libc::SIGINT) };
    let w = watch.finish(Duration::from_secs(20));
    let r = report.finish(Duration::from_secs(20));
    assert!(w.status.success() && r.status.success());

    let s = stats(&watch_stats);
    let lost = s["kernel"]["lost"].as_u64().unwrap();
    assert!(lost > 0, "a 4 KiB ring must overflow: {s}");
    assert_eq!(
        s["received"], s["kernel"]["emitted"],
        "everything submitted was received: produced - received == lost"
    );
    let recursion: u64 = s["programs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["recursion_misses"].as_u64().unwrap())
        .sum();
    // A skipped run can leave a timer start that no close took: a birth unjoined, counted too.
    let unjoined = s["kernel"]["birth_unmatched"].as_u64().unwrap();
    assert_eq!(
        lost_from(&w.stderr),
        lost + recursion + unjoined,
        "{}",
        w.stderr
    );

    let doc: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(doc["complete"], false, "the report says it is incomplete");
    let rs = stats(&report_stats);
    assert!(rs["kernel"]["lost"].as_u64().unwrap() > 0, "{rs}");
    assert_eq!(rs["received"], rs["kernel"]["emitted"]);
    assert_eq!(
        doc["totals"]["lost_events"].as_u64().unwrap(),
        rs["kernel"]["lost"].as_u64().unwrap()
            + rs["kernel"]["birth_unmatched"].as_u64().unwrap()
            + rs["programs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["recursion_misses"].as_u64().unwrap())
                .sum::<u64>()
    );
    let _ = std::fs::remove_file(&watch_stats);
    let _ = std::fs::remove_file(&report_stats);
}

/// The daemon under the same overload keeps serving, shows the loss, and counts exactly again
/// once the load is gone.
#[test]
fn serve_survives_overload_and_recovers() {
    require_root();
    let _g = exclusive();
    let ns = Netns::new("rec");
    let http_port = unique_port();
    let listen = format!("127.0.0.1:{http_port}");
    // The loss as serve shows it after dropping its privileges: before 5.19 the kernel refuses
    // it the counters' map and the collector process relays them; debug builds take that path
    // on any kernel (TWTRACE_TEST_RELAY_COUNTERS).
    let mut cmd = Command::new(twtrace_bin());
    cmd.args(["serve", "--listen", &listen, "--ring-size", "4096"])
        .env("TWTRACE_TEST_RELAY_COUNTERS", "1");
    let serve = Run::spawn(cmd, "serving on");
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(Some(&ns), &addr, &[]);
    // The daemon is stopped while the load runs, so that its 4 KiB ring overflows for sure.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(serve.pid() as i32, libc::SIGSTOP) };
    thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| client(Some(&ns), &["--to", &addr, "--count", "3000"]));
        }
    });
    // SAFETY: as above.
    unsafe { libc::kill(serve.pid() as i32, libc::SIGCONT) };
    let ring_full = |metrics: &String| -> Option<f64> {
        metrics
            .lines()
            .find(|l| l.starts_with("twtrace_events_lost_total{cause=\"ring_full\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
    };
    // Once it has caught up (its figures are gathered once a second).
    let metrics = poll_until(
        || http_get(&listen, "/metrics").1,
        |m| ring_full(m).is_some_and(|l| l > 0.0),
    );
    let lost = ring_full(&metrics).unwrap_or_else(|| panic!("{metrics}\n{}", serve.where_now()));
    assert!(lost > 0.0, "{metrics}");
    // Light load afterwards: a new peer's 13 births are all there.
    let quiet_port = unique_port();
    let quiet = format!("127.0.0.1:{quiet_port}");
    let _quiet_server = Server::start(Some(&ns), &quiet, &[]);
    client(Some(&ns), &["--to", &quiet, "--count", "13"]);
    let quiet_entered = |doc: &Value| {
        doc["groups"].as_array().and_then(|g| {
            g.iter()
                .find(|g| g["key"] == quiet.as_str())
                .map(|g| g["entered"].clone())
        })
    };
    let doc: Value = poll_until(
        || {
            let (_, body) = http_get(&listen, "/api/v1/report?by=peer&top=1000");
            serde_json::from_str(&body).unwrap()
        },
        |doc| quiet_entered(doc).is_some_and(|n| n == 13),
    );
    let g = doc["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == quiet.as_str())
        .unwrap_or_else(|| panic!("{doc}"));
    assert_eq!(g["entered"], 13);
    assert_eq!(doc["complete"], false, "the loss stays on record");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(serve.pid() as i32, libc::SIGTERM) };
    assert!(serve.finish(Duration::from_secs(10)).status.success());
}

/// Sockets that never reach CLOSE normally (resets, refused connects, processes that exit
/// holding connections) leave nothing in the kernel's owner map.
#[test]
fn owners_are_forgotten_however_sockets_end() {
    require_root();
    let _g = exclusive();
    let ns = Netns::new("own");
    let stats_path = std::env::temp_dir().join(format!("twt-own-{}.json", std::process::id()));
    let w = Run::start(
        &[
            "watch",
            "--json",
            "--stats-json",
            stats_path.to_str().unwrap(),
        ],
        "tracing TIME_WAIT",
    );
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    {
        let _server = Server::start(Some(&ns), &addr, &[]);
        // Closed by a reset (SO_LINGER 0).
        client(Some(&ns), &["--to", &addr, "--count", "200", "--linger0"]);
        // Normal closes.
        client(Some(&ns), &["--to", &addr, "--count", "200"]);
        // A process that exits holding connections: the kernel closes them.
        client(Some(&ns), &["--to", &addr, "--count", "200", "--hold"]);
    }
    // Refused connects: SYN_SENT -> CLOSE on the RST.
    let closed = unique_port();
    ns.exec_ok(&[
        "bash",
        "-c",
        &format!(
            "for i in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/{closed}) 2>/dev/null; done; true"
        ),
    ]);
    // The server (and its side of every connection) went away with its scope.
    thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(w.pid() as i32, libc::SIGINT) };
    let r = w.finish(Duration::from_secs(10));
    assert!(r.status.success());
    let s = stats(&stats_path);
    let _ = std::fs::remove_file(&stats_path);
    let owners = s["owners"].as_u64().unwrap();
    assert!(
        owners < 10,
        "{owners} owner entries left after 600 connections that all ended: {s}"
    );
    assert_eq!(s["kernel"]["owner_store_failed"], 0);
}
