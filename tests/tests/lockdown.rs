//! `lockdown=confidentiality`: the kernel removes `bpf_probe_read_kernel` from tracing programs
//! (LOCKDOWN_BPF_READ_KERNEL), so twtrace loads with typed loads only, and the timer programs
//! cannot read the timewait socket behind a timer. The hidden `--typed-only` loads that same
//! mode on any kernel: these tests prove, on the running kernel, that no program of that mode
//! calls the helper (so the verifier of a locked-down kernel has nothing to refuse), and that
//! births and every kind of end stay exact, checked against the clients and `ss` in a
//! namespace of the test's own. (The kernel matrix boots a really locked-down kernel.)

use std::{process::Command, thread, time::Duration};

use serde_json::Value;
use twtrace_tests::*;

/// The ids of the BPF programs a process holds, from its descriptors' fdinfo (`prog_id:`; this
/// bpftool cannot list programs by process).
fn program_ids(pid: u32) -> Vec<String> {
    let mut ids = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).expect("fdinfo") {
        let text = std::fs::read_to_string(fd.expect("entry").path()).unwrap_or_default();
        if let Some(id) = text.lines().find_map(|l| l.strip_prefix("prog_id:")) {
            ids.push(id.trim().to_owned());
        }
    }
    // A program's own descriptor and its link's both name it.
    ids.sort();
    ids.dedup();
    ids
}

/// The helper calls of the programs a twtrace process has loaded (`bpftool prog dump xlated`),
/// by program name.
fn helper_calls(pid: u32) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    for id in program_ids(pid) {
        let info: Value = serde_json::from_str(&run(
            Command::new("bpftool").args(["-j", "prog", "show", "id", &id])
        ))
        .expect("bpftool JSON");
        let text = run(Command::new("bpftool").args(["prog", "dump", "xlated", "id", &id]));
        let mut calls: Vec<String> = text
            .split_whitespace()
            .filter(|w| w.starts_with("bpf_") && w.contains('#'))
            .map(|w| w.split('#').next().unwrap_or(w).to_owned())
            .collect();
        calls.sort();
        calls.dedup();
        found.push((info["name"].as_str().unwrap_or("?").to_owned(), calls));
    }
    found.sort();
    found
}

/// Every program loaded with `--typed-only` reads the kernel through typed loads alone: no
/// `bpf_probe_read_kernel` (nor its `_str` and compat forms) anywhere in what the verifier
/// accepted. The normal mode does call it (the timer programs read the timewait socket), so the
/// check sees the calls when they are there.
#[test]
fn typed_only_programs_never_call_bpf_probe_read() {
    require_root();
    let _g = shared();
    let normal = Watch::start(&[]);
    let typed = Watch::start(&["--typed-only"]);
    // With the kernel programs' log (aya-log) on too.
    let logging = Watch::start(&["--typed-only", "--debug-kernel"]);
    let normal_calls = helper_calls(normal.pid());
    let typed_calls = helper_calls(typed.pid());
    let logging_calls = helper_calls(logging.pid());
    drop((normal.stop(), typed.stop(), logging.stop()));

    let names = |l: &[(String, Vec<String>)]| l.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    let expected = [
        "inet_sock_set_state",
        "timer_cancel",
        "timer_expire_entry",
        "timer_start",
    ];
    assert_eq!(names(&typed_calls), expected, "{typed_calls:?}");
    assert_eq!(names(&normal_calls), expected, "{normal_calls:?}");
    assert_eq!(names(&logging_calls), expected, "{logging_calls:?}");
    for (name, calls) in typed_calls.iter().chain(&logging_calls) {
        assert!(
            !calls.iter().any(|c| c.contains("probe_read")),
            "{name} calls {calls:?}"
        );
    }
    let cancel = &normal_calls
        .iter()
        .find(|(n, _)| n == "timer_cancel")
        .unwrap()
        .1;
    // Under lockdown=confidentiality there is no normal mode: the kernel makes every load
    // typed-only, and the helper appears nowhere.
    assert_eq!(
        cancel.iter().any(|c| c == "bpf_probe_read_kernel"),
        !confidentiality(),
        "the normal timer_cancel reads the timewait socket, except under confidentiality: \
         {cancel:?}"
    );
}

fn of<'a>(w: &'a WatchResult, event: &'a str, port: u16) -> Vec<&'a Value> {
    w.of_kind(event)
        .filter(|e| e["local_port"] == port || e["remote_port"] == port)
        .collect()
}

/// One watch in the typed-only mode, every kind of birth and end in a namespace: births with
/// their exact 4-tuples and owners, an end by `ss -K` (killed), by tcp_tw_reuse (reused), by
/// a new SYN (syn), and a FIN_WAIT2 substate told by its timeout, then its re-arm to
/// TIME_WAIT when the peer's FIN comes.
#[test]
fn typed_only_births_and_every_end_are_exact() {
    require_root();
    let _g = shared();
    let ns = Netns::new("typed");
    ns.sysctl("net.ipv4.tcp_tw_reuse", "2");
    ns.sysctl("net.ipv4.tcp_fin_timeout", "5");
    let w = Watch::start(&["--typed-only", "--netns", &ns.name]);
    let (p_births, p_reuse, p_syn, p_fw2) =
        (unique_port(), unique_port(), unique_port(), unique_port());
    let at = |p: u16| format!("127.0.0.1:{p}");

    // Births: the client closes first, six times.
    let _s1 = Server::start(Some(&ns), &at(p_births), &[]);
    let births = client(Some(&ns), &["--to", &at(p_births), "--count", "6"]);
    // Killed: `ss -K` destroys the first one where the kernel can: 5.10's tcp_abort has no
    // timewait case (ARCHITECTURE.md, "Across kernels"), the socket stays and no end is due.
    // What the kernel did decides how many `killed` ends there must be: exactly that many.
    let killed_port = births.local_ports[0];
    ns.exec_ok(&[
        "ss",
        "-K",
        "state",
        "time-wait",
        "sport",
        "=",
        &format!(":{killed_port}"),
    ]);
    let left = wait_for(5, || ns.ss_time_wait(p_births).len());
    assert!(left == 5 || left == 6, "{left} TIME_WAIT of 6 after ss -K");
    let kills = 6 - left;

    // Reused: the same source port to the same destination, a second later.
    let _s2 = Server::start(Some(&ns), &at(p_reuse), &[]);
    let bind = at(unique_port());
    let once = ["--to", &at(p_reuse), "--count", "1", "--bind", &bind];
    let first = client(Some(&ns), &once);
    thread::sleep(Duration::from_millis(1200));
    let second = client(Some(&ns), &once);

    // Syn: the server closed first; the client's next SYN on the same 4-tuple takes over.
    let s3 = Server::start(Some(&ns), &at(p_syn), &["--closer", "server"]);
    let bind = at(unique_port());
    let once = [
        "--to",
        &at(p_syn),
        "--count",
        "1",
        "--bind",
        &bind,
        "--closer",
        "server",
    ];
    client(Some(&ns), &once);
    thread::sleep(Duration::from_millis(1200));
    client(Some(&ns), &once);

    // FIN_WAIT2: the server closes 300 ms after the client (tcp_fin_timeout 5 s here).
    let _s4 = Server::start(Some(&ns), &at(p_fw2), &["--close-after", "300"]);
    let fw2 = client(Some(&ns), &["--to", &at(p_fw2), "--count", "2"]);

    let mut seen = Vec::new();
    w.wait_until(Duration::from_secs(10), &mut seen, |s| {
        s.iter().filter(|e| e["event"] == "tw_exit").count() >= 2 + kills
            && s.iter().filter(|e| e["event"] == "tw_rearm").count() >= 2
    });
    let r = w.stop_with(libc::SIGINT, seen);
    assert!(r.stderr.contains("0 events lost"), "{}", r.stderr);

    // Births: exactly the client's ports, its pid, TIME_WAIT for 60 s.
    let born = of(&r, "tw_enter", p_births);
    let mut ports: Vec<u64> = born
        .iter()
        .map(|e| e["local_port"].as_u64().unwrap())
        .collect();
    ports.sort_unstable();
    let mut expected: Vec<u64> = births.local_ports.iter().map(|&p| p as u64).collect();
    expected.sort_unstable();
    assert_eq!(ports, expected, "{:?}", r.events);
    for e in &born {
        assert_eq!(e["pid"], births.pid, "{e}");
        assert_eq!(e["substate"], "TIME_WAIT", "{e}");
        assert_armed_ms(&e["timeout_ms"], 60000, &e.to_string());
        assert_eq!(e["netns"], ns.inode(), "{e}");
        assert_eq!(e["remote_addr"], "127.0.0.1");
    }
    let killed = of(&r, "tw_exit", p_births);
    assert_eq!(killed.len(), kills, "{killed:?}");
    for k in &killed {
        assert_eq!(k["reason"], "killed");
        assert_eq!(k["local_port"], killed_port);
    }
    assert_eq!(
        ns.ss_time_wait(p_births).len(),
        left,
        "the kernel's count after ss -K"
    );

    let reused = of(&r, "tw_exit", p_reuse);
    assert_eq!(reused.len(), 1, "{reused:?}");
    assert_eq!(reused[0]["reason"], "reused", "{}", reused[0]);
    assert_eq!(
        reused[0]["pid"], first.pid,
        "the TIME_WAIT's owner, not the reuser"
    );
    let reborn = of(&r, "tw_enter", p_reuse);
    assert_eq!(reborn.len(), 2);
    assert_eq!(reborn[1]["pid"], second.pid);

    let syn = of(&r, "tw_exit", p_syn);
    assert_eq!(syn.len(), 1, "{syn:?}");
    assert_eq!(syn[0]["reason"], "syn", "{}", syn[0]);
    assert_eq!(syn[0]["local_port"], p_syn);
    assert_eq!(syn[0]["pid"], s3.pid);

    let fw2_born = of(&r, "tw_enter", p_fw2);
    assert_eq!(fw2_born.len(), 2, "{fw2_born:?}");
    for e in &fw2_born {
        assert_eq!(e["substate"], "FIN_WAIT2", "told by its 5 s timeout: {e}");
        assert_armed_ms(&e["fin_wait2_timeout_ms"], 5000, &e.to_string());
        assert_eq!(e["pid"], fw2.pid);
    }
    let rearms = of(&r, "tw_rearm", p_fw2);
    assert_eq!(rearms.len(), 2, "{rearms:?}");
    for e in &rearms {
        assert_eq!(
            (e["from"].as_str(), e["substate"].as_str()),
            (Some("FIN_WAIT2"), Some("TIME_WAIT"))
        );
        assert_armed_ms(&e["timeout_ms"], 60000, &e.to_string());
        assert_eq!(e["pid"], fw2.pid, "known from the birth: {e}");
    }
    assert_eq!(ns.ss_time_wait(p_fw2).len(), 2);
}

/// Where securityfs is not mounted (`ip netns exec` mounts a fresh /sys without it) the
/// lockdown mode cannot be read: the kernel's refusal of `bpf_probe_read_kernel` says it all
/// the same, and twtrace loads again with typed loads only and says what that mode cannot see.
/// The refusal is injected here (a debug build's `TWTRACE_TEST_REFUSE_PROBE_READ`); the kernel
/// matrix's confidentiality lane has the kernel's own, inside `ip netns exec`.
#[test]
fn a_refused_probe_read_loads_the_typed_only_programs() {
    require_root();
    // Alone: "nothing left loaded" counts every twtrace program in the kernel, and a test
    // running beside this one would have its own loaded.
    let _g = exclusive();
    let before = quiet_programs();
    let mut cmd = Command::new(twtrace_bin());
    cmd.args(["watch", "--json"])
        .env("TWTRACE_TEST_REFUSE_PROBE_READ", "1");
    let r = Run::spawn(cmd, "tracing TIME_WAIT");
    let calls = helper_calls(r.pid());
    let out = r.interrupt(Duration::from_secs(10));
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("twtrace: the kernel is locked down in confidentiality mode"),
        "{}",
        out.stderr
    );
    let names: Vec<&str> = calls.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "inet_sock_set_state",
            "timer_cancel",
            "timer_expire_entry",
            "timer_start"
        ],
        "exactly the second load's programs: {calls:?}"
    );
    for (name, c) in &calls {
        assert!(
            !c.iter().any(|h| h.starts_with("bpf_probe_read")),
            "{name} calls {c:?}"
        );
    }
    assert_eq!(settled_programs(before), before, "nothing left loaded");
}
