//! Every network namespace seen whole: twtrace runs in one namespace, the traffic lives in
//! others (as on a container host, where twtrace runs in the node's namespace and each pod has
//! its own), and every figure is checked against the kernel's own accounting of the namespace
//! it is about: its sockstat, its sysctls, `ss` run inside it.

use std::{collections::BTreeSet, thread, time::Duration, time::Instant};

use serde_json::Value;
use twtrace_tests::*;

fn json(r: &RunResult) -> Value {
    serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", r.stdout, r.stderr))
}

/// The entry of `list` (an array of objects) whose `key` is `value`.
fn entry<'a>(list: &'a Value, key: &str, value: impl Into<Value>) -> &'a Value {
    let value = value.into();
    list.as_array()
        .and_then(|a| a.iter().find(|e| e[key] == value))
        .unwrap_or_else(|| panic!("no entry with {key} = {value} in {list}"))
}

fn findings<'a>(doc: &'a Value, kind: &str) -> Vec<&'a Value> {
    doc["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .filter(|f| f["kind"] == kind)
        .collect()
}

/// 50 TIME_WAIT in a namespace, twtrace in the host's: "kernel says" counts the same set of
/// namespaces as twtrace's own figure, and each namespace's figures are the kernel's there.
/// (Field case 25: twtrace said 50 and the kernel 0, reading only its own namespace.)
#[test]
fn kernel_figures_cover_the_namespaces_twtrace_counts() {
    require_root();
    let _g = shared();
    let ns = Netns::new("tw50");
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(Some(&ns), &addr, &[]);
    let rep = Run::start(
        &["report", "--json", "--duration", UNTIL_INTERRUPTED],
        "collecting",
    );
    let tab = Run::start(&["report", "--duration", UNTIL_INTERRUPTED], "collecting");
    let run = client(Some(&ns), &["--to", &addr, "--count", "50"]);
    assert_eq!(run.local_ports.len(), 50);
    let kernel = wait_for(50, || ns.sockstat_tw());
    let doc = json(&rep.interrupt(Duration::from_secs(30)));
    // (Once on 5.10 under emulation the kernel held 49: the picture says which one went.)
    assert_eq!(
        kernel,
        50,
        "the namespace's own count: {}\n{doc}",
        ns.tcp_picture()
    );
    let table = tab.interrupt(Duration::from_secs(30)).stdout;

    let ours = entry(&doc["namespaces"], "netns", ns.inode());
    assert_eq!(ours["name"], ns.name.as_str(), "named after /run/netns");
    assert_eq!(ours["in_time_wait"], 50);
    assert_eq!(ours["kernel_time_wait"], 50);
    assert_eq!(ours["ephemeral_ports"], 28232);
    // The totals are the sums over the same namespaces.
    let sum = |k: &str| -> u64 {
        doc["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n[k].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(doc["totals"]["in_time_wait"], sum("in_time_wait"), "{doc}");
    assert_eq!(doc["totals"]["kernel_time_wait"], sum("kernel_time_wait"));
    let g = entry(&doc["groups"], "key", addr.as_str());
    assert_eq!(g["netns"]["inode"], ns.inode());
    assert_eq!(g["in_time_wait"], 50);
    assert_eq!(g["entered"], 50);
    assert_eq!(g["processes"][0]["pid"], run.pid);
    // The table has a line per namespace: the test's says 50 and 50.
    let line = table
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with(&ns.name[..ns.name.len().min(16)])
        })
        .unwrap_or_else(|| panic!("no line for {} in:\n{table}", ns.name));
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[1..5], ["50", "timewait,", "kernel", "50;"], "{line}");
}

/// A client in a namespace holds 200 CLOSE_WAIT (its server closed, it never does): report and
/// doctor, in the host's namespace, name its pid, its name, 200, and its namespace, as `ss`
/// inside the namespace does. (Field case 26.)
#[test]
fn close_wait_in_another_namespace_names_its_holder() {
    require_root();
    let _g = shared();
    let ns = Netns::new("cw");
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(Some(&ns), &addr, &["--closer", "server"]);
    let doctor = Run::start(
        &["doctor", "--json", "--duration", UNTIL_INTERRUPTED],
        "watching",
    );
    let report = Run::start(
        &["report", "--json", "--duration", UNTIL_INTERRUPTED],
        "collecting",
    );
    let holder = Holder::start(
        Some(&ns),
        &["--to", &addr, "--count", "200", "--closer", "server"],
    );
    let pid = holder.run.pid;
    let held = || {
        ns.exec_ok(&["ss", "-Htanp", "state", "close-wait"])
            .lines()
            .filter(|l| l.contains(&format!("pid={pid},")))
            .count()
    };
    assert_eq!(wait_for(200, held), 200, "ss in the namespace");
    let d = doctor.interrupt(Duration::from_secs(30));
    let r = json(&report.interrupt(Duration::from_secs(30)));

    let cw = entry(&r["close_wait"], "pid", pid);
    assert_eq!(cw["comm"], "twt-churn");
    assert_eq!(cw["sockets"], 200);
    assert_eq!(cw["netns"]["inode"], ns.inode());
    assert_eq!(cw["netns"]["name"], ns.name.as_str());
    assert!(cw["listener_port"].is_null());

    let doc = json(&d);
    let f: Vec<&Value> = findings(&doc, "close_wait")
        .into_iter()
        .filter(|f| f["data"]["pid"] == pid)
        .collect();
    assert_eq!(f.len(), 1, "{doc}");
    assert_eq!(f[0]["data"]["sockets"], 200);
    assert_eq!(f[0]["data"]["grew"], 200);
    assert_eq!(f[0]["data"]["netns"]["inode"], ns.inode());
    assert_eq!(f[0]["severity"], "warning");
    assert!(
        f[0]["title"].as_str().unwrap().contains(&format!(
            "twt-churn[{pid}] holds 200 CLOSE_WAIT sockets (netns {})",
            ns.name
        )),
        "{}",
        f[0]["title"]
    );
    assert_eq!(d.status.code(), Some(9));
}

/// A namespace whose port range is narrower than the host's, a client running out of ports
/// there: doctor, in the host's namespace, judges it with that namespace's range and tcp_tw_reuse,
/// and the failure it predicts comes when connect() starts failing (within 20 %).
#[test]
fn doctor_judges_a_namespace_by_its_own_port_range_and_predicts_the_failure() {
    require_root();
    let _g = shared();
    let ns = Netns::new("ports");
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40299");
    ns.sysctl("net.ipv4.tcp_tw_reuse", "0");
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(Some(&ns), &addr, &[]);
    let doctor = Run::start(&["doctor", "--json", "--duration", "5s"], "watching");
    let started = Instant::now();
    let started_at = monotonic_s();
    let (d, watched_s, run) = thread::scope(|s| {
        let churn = s.spawn(|| {
            let args = [
                "--to",
                &addr,
                "--count",
                "560",
                "--rate",
                "40",
                "--tolerate-errors",
            ];
            client(Some(&ns), &args)
        });
        let d = doctor.finish(Duration::from_secs(30));
        let watched_s = started.elapsed().as_secs_f64();
        (d, watched_s, churn.join().expect("client"))
    });
    assert_eq!(d.status.code(), Some(9), "{}", d.stderr);
    let doc = json(&d);
    let f: Vec<&Value> = findings(&doc, "port_exhaustion")
        .into_iter()
        .filter(|f| f["data"]["netns"]["inode"] == ns.inode())
        .collect();
    assert_eq!(f.len(), 1, "{doc}");
    let data = &f[0]["data"];
    assert_eq!(f[0]["severity"], "critical");
    assert_eq!(
        data["usable_ports"], 300,
        "the namespace's range, not the host's"
    );
    assert_eq!(data["tw_reuse_applies"], false);
    assert_eq!(data["destination"], addr.as_str());
    // Every connection made while it watched is still in TIME_WAIT, with those made between
    // the end of the watch and the socket dump.
    assert!(data["in_time_wait"].as_u64() >= data["births"].as_u64());
    assert!(data["held"].as_u64() >= data["in_time_wait"].as_u64());
    // What happened: 300 connections, then EADDRNOTAVAIL for the rest.
    assert_eq!(run.local_ports.len(), 300);
    assert_eq!(run.errors.get("EADDRNOTAVAIL"), Some(&260));
    // On the test's timeline: the client starts a moment after doctor's window does.
    let actual = run.first_error_at.expect("connect() failed") - started_at;
    assert_prediction(
        doc["duration_s"].as_f64().unwrap(),
        watched_s,
        data["time_left_s"].as_f64().expect("a time left"),
        actual,
    );
}

/// twtrace inside namespace A, whose range is 1,000 ports, while a client churns at 60/s in
/// namespace B: B's traffic is judged with B's range (and found harmless), and nothing is said
/// about A's range.
#[test]
fn doctor_in_one_namespace_judges_the_others_by_their_own_settings() {
    require_root();
    // doctor judges every namespace: no other test's traffic may run meanwhile.
    let _g = exclusive();
    let a = Netns::new("a");
    a.sysctl("net.ipv4.ip_local_port_range", "40000 40999");
    let b = Netns::new("b");
    // No reuse in B: its 150/s keep 9,000 ports at steady state, a share of its 28,232 worth a
    // word (with reuse they would keep only a second's worth, too few to mention). doctor's
    // rate is the births over its whole window, which ends a moment after the traffic: on a slow
    // machine (a guest under emulation) that window is seconds longer than the traffic, and the
    // rate still stays above the 10 % (47/s) that is worth a word and below the 50 % (235/s)
    // that is a warning.
    b.sysctl("net.ipv4.tcp_tw_reuse", "0");
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(Some(&b), &addr, &[]);
    let doctor = Run::start_in(
        Some(&a),
        &["doctor", "--json", "--duration", UNTIL_INTERRUPTED],
        "watching",
    );
    let run = client(
        Some(&b),
        &["--to", &addr, "--count", "900", "--rate", "150"],
    );
    assert_eq!(run.local_ports.len(), 900);
    // doctor's window closes once the kernel holds the 900 TIME_WAIT. (On 5.10 under
    // emulation the kernel's own count stopped at 899 twice in four runs: the births below are
    // what the kernel created, whatever became of one after; the picture says what.)
    let kernel = wait_for(900, || b.sockstat_tw());
    if kernel != 900 {
        eprintln!("sockstat tw {kernel} of 900:\n{}", b.tcp_picture());
    }
    let d = doctor.interrupt(Duration::from_secs(30));
    let doc = json(&d);
    assert_eq!(d.status.code(), Some(0), "nothing serious: {doc}");
    let f = findings(&doc, "port_exhaustion");
    let ours: Vec<&&Value> = f
        .iter()
        .filter(|f| f["data"]["destination"] == addr.as_str())
        .collect();
    assert_eq!(ours.len(), 1, "{doc}");
    assert_eq!(ours[0]["severity"], "info");
    assert_eq!(ours[0]["data"]["usable_ports"], 28232, "B's range");
    assert_eq!(ours[0]["data"]["netns"]["inode"], b.inode());
    assert_eq!(ours[0]["data"]["births"], 900);
    for f in doc["findings"].as_array().unwrap() {
        assert_ne!(
            f["data"]["netns"]["inode"],
            a.inode(),
            "nothing about A: {f}"
        );
        assert_ne!(
            f["data"]["usable_ports"], 1000,
            "A's range judges nothing: {f}"
        );
    }
}

/// `--netns` keeps one namespace's traffic (by name, inode or pid:PID); a name that names
/// nothing is refused with one line and exit code 2.
#[test]
fn netns_filter_keeps_one_namespace_and_refuses_unknown_names() {
    require_root();
    let _g = shared();
    let (x, y) = (Netns::new("x"), Netns::new("y"));
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let (_sx, _sy) = (
        Server::start(Some(&x), &addr, &[]),
        Server::start(Some(&y), &addr, &[]),
    );
    let by_name = Run::start(
        &[
            "report",
            "--json",
            "--duration",
            UNTIL_INTERRUPTED,
            "--netns",
            &x.name,
        ],
        "collecting",
    );
    let by_inode = Run::start(
        &[
            "report",
            "--json",
            "--duration",
            UNTIL_INTERRUPTED,
            "--netns",
            &y.inode().to_string(),
            "--by",
            "netns",
        ],
        "collecting",
    );
    client(Some(&x), &["--to", &addr, "--count", "7"]);
    client(Some(&y), &["--to", &addr, "--count", "11"]);
    assert_eq!(wait_for(7, || x.sockstat_tw()), 7);
    assert_eq!(wait_for(11, || y.sockstat_tw()), 11);
    let dx = json(&by_name.interrupt(Duration::from_secs(30)));
    let dy = json(&by_inode.interrupt(Duration::from_secs(30)));
    assert_eq!(dx["totals"]["entered"], 7, "{dx}");
    assert_eq!(dx["namespaces"].as_array().unwrap().len(), 1);
    assert_eq!(dx["namespaces"][0]["netns"], x.inode());
    assert_eq!(dx["namespaces"][0]["kernel_time_wait"], 7);
    assert_eq!(dy["totals"]["entered"], 11, "{dy}");
    assert_eq!(dy["groups"].as_array().unwrap().len(), 1);
    assert_eq!(dy["groups"][0]["key"], y.inode().to_string());
    assert_eq!(dy["groups"][0]["netns"]["name"], y.name.as_str());

    let out = std::process::Command::new(twtrace_bin())
        .args(["report", "--netns", "no-such-namespace"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'no-such-namespace' names no network namespace"),
        "{err}"
    );
    // One line says what is wrong (clap adds its usual pointer to --help).
    assert_eq!(
        err.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{err}"
    );
}

/// A namespace bind-mounted nowhere and held only by another user's process: twtrace finds it
/// through that process's /proc/PID/ns/net, which root may read only with CAP_SYS_PTRACE.
/// Without it the namespace cannot be found, yet its TIME_WAIT are counted: twtrace counts it
/// as unreadable instead of leaving its figures out in silence (seen in the deployments with
/// podman: the count said 0).
#[test]
fn a_namespace_twtrace_cannot_find_is_counted_as_unreadable() {
    require_root();
    // Alone: `namespaces_unreadable` counts every namespace with traffic, and a test beside
    // this one can leave its namespace's sockets closing after its last process is gone (alive,
    // yet found by nothing: unreadable, rightly).
    let _g = exclusive();
    const N: u64 = 9;
    let port = unique_port();
    let args = [
        "report",
        "--json",
        "--duration",
        UNTIL_INTERRUPTED,
        "--by",
        "netns",
    ];
    let full = Run::start(&args, "collecting");
    let mut cmd = std::process::Command::new("setpriv");
    cmd.arg("--bounding-set=-sys_ptrace")
        .arg(twtrace_bin())
        .args(args);
    let blind = Run::spawn(cmd, "collecting");
    // `unshare -n` execs the shell: the namespace's holder, nobody after setpriv. (The server
    // serves N connections, or until its stdin closes: 60 s at most.)
    let churn = churn_bin();
    let churn = churn.to_str().unwrap();
    let script = format!(
        "ip link set lo up && exec setpriv --reuid=65534 --regid=65534 --clear-groups sh -c \
         'sleep 60 | {churn} server --listen 127.0.0.1:{port} --count {N} >/dev/null & \
          sleep 0.3; {churn} client --to 127.0.0.1:{port} --count {N} >/dev/null && \
          echo done && exec sleep 60'"
    );
    let mut holder = std::process::Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("unshare");
    let inode = {
        use std::os::unix::fs::MetadataExt;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "done", "the traffic ran");
        std::fs::metadata(format!("/proc/{}/ns/net", holder.id()))
            .unwrap()
            .ino() as u32
    };
    assert_eq!(wait_for(N, || sockstat_tw_of(holder.id())), N);
    let full = json(&full.interrupt(Duration::from_secs(30)));
    let blind_run = blind.interrupt(Duration::from_secs(30));
    let _ = holder.kill();
    let _ = holder.wait();
    let blind = json(&blind_run);

    // Both count the traffic; only the one that could find the namespace read it.
    for doc in [&full, &blind] {
        assert_eq!(
            entry(&doc["groups"], "key", inode.to_string())["entered"],
            N,
            "{doc}"
        );
    }
    let seen = entry(&full["namespaces"], "netns", inode);
    assert_eq!(seen["kernel_time_wait"], N, "{seen}");
    assert_eq!(full["namespaces_unreadable"], 0, "{full}");
    let unseen = entry(&blind["namespaces"], "netns", inode);
    assert!(unseen["kernel_time_wait"].is_null(), "{unseen}");
    assert_eq!(unseen["in_time_wait"], N);
    assert_eq!(blind["namespaces_unreadable"], 1, "{blind}");
}

fn metric(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn netns_labels(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let i = l.find("netns=\"")? + 7;
            Some(l[i..i + l[i..].find('"')?].to_owned())
        })
        .collect()
}

/// Scrapes until `done` holds of the text, every half second, for 10 s at most; the last text.
fn scrape_until(scrape: &dyn Fn() -> String, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape();
        if done(&text) || Instant::now() > deadline {
            return text;
        }
        thread::sleep(Duration::from_millis(500));
    }
}

fn vm_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// serve labels every group with its namespace, exports each namespace's kernel figures (equal
/// to its sockstat), and drops a namespace's series once it is gone; 500 short-lived
/// namespaces, made and gone while it runs, end as `killed` and leave no series and no memory
/// behind.
#[test]
fn serve_follows_namespaces_as_they_come_and_go() {
    require_root();
    let _g = shared();
    let listen = format!("127.0.0.1:{}", unique_port());
    let serve = Run::start(&["serve", "--listen", &listen], "serving");
    // An emulated guest (the kernel matrix) can keep serve past one read's 10 s while 500
    // namespaces come and go: a few tries, bounded, before a scrape counts as failed.
    let scrape = || {
        let mut tries = 0;
        loop {
            let (status, body) = http_get(&listen, "/metrics");
            tries += 1;
            if status == 200 || tries == 3 {
                assert_eq!(
                    status,
                    200,
                    "after {tries} tries: {body}\n{}",
                    serve.where_now()
                );
                return body;
            }
            thread::sleep(Duration::from_millis(500));
        }
    };
    let ns = Netns::new("served");
    let inode = ns.inode().to_string();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let server = Server::start(Some(&ns), &addr, &[]);
    client(Some(&ns), &["--to", &addr, "--count", "23"]);
    assert_eq!(wait_for(23, || ns.sockstat_tw()), 23);
    // Figures are gathered once a second: scraped until they show the 23.
    let g =
        format!("twtrace_timewait_sockets{{group=\"netns\",key=\"{inode}\",netns=\"{inode}\"}}");
    let kernel = format!("twtrace_kernel_timewait_sockets{{netns=\"{inode}\"}}");
    let text = scrape_until(&scrape, |t| {
        metric(t, &g) == Some(23.0) && metric(t, &kernel) == Some(23.0)
    });
    assert_eq!(metric(&text, &g), Some(23.0), "{text}");
    assert_eq!(metric(&text, &kernel), Some(ns.sockstat_tw() as f64));
    assert_eq!(
        metric(
            &text,
            &format!(
                "twtrace_netns_info{{netns=\"{inode}\",name=\"{}\"}}",
                ns.name
            )
        ),
        Some(1.0)
    );
    let peer =
        format!("twtrace_timewait_sockets{{group=\"peer\",key=\"{addr}\",netns=\"{inode}\"}}");
    assert_eq!(metric(&text, &peer), Some(23.0));
    // Host-wide counters also count whatever else the host does meanwhile: exact counts come
    // from a watch of the test's own port.
    let killed =
        |t: &str| metric(t, "twtrace_host_timewait_exited_total{reason=\"killed\"}").unwrap();
    let killed_before = killed(&text);

    // The namespace goes: its 23 TIME_WAIT are killed, its series end (once discovery has
    // missed it for host::collect::GONE_AFTER).
    let watch = Watch::start(&["--port", &port.to_string()]);
    drop(server);
    drop(ns);
    let text = scrape_until(&scrape, |t| !netns_labels(t).contains(&inode));
    assert!(!netns_labels(&text).contains(&inode), "{text}");
    assert!(killed(&text) - killed_before >= 23.0);
    let w = watch.stop();
    assert_eq!(
        w.of_kind("tw_exit")
            .filter(|e| e["reason"] == "killed")
            .count(),
        23
    );

    // 500 namespaces made, used (2 TIME_WAIT each, towards 127.0.0.1:7000) and gone.
    let rss_before = vm_rss_kb(serve.pid());
    let watch = Watch::start(&["--port", "7000"]);
    churn_namespaces(500, 2);
    let live = || sh("ip netns list | wc -l").trim().parse::<usize>().unwrap();
    let text = scrape_until(&scrape, |t| netns_labels(t).len() <= live() + 2);
    let w = watch.stop();
    // (Once, on 6.1 under lockdown=confidentiality and emulation, 999: the loss line says why.)
    assert_eq!(w.of_kind("tw_enter").count(), 1000, "{}", w.stderr);
    assert_eq!(
        w.of_kind("tw_exit")
            .filter(|e| e["reason"] == "killed")
            .count(),
        1000,
        "{}",
        w.stderr
    );
    let namespaces: BTreeSet<u64> = w
        .of_kind("tw_enter")
        .map(|e| e["netns"].as_u64().expect("netns"))
        .collect();
    assert!(
        namespaces.len() > 1,
        "each in its own namespace: {namespaces:?}"
    );
    assert!(killed(&text) - killed_before >= 1023.0);
    let labels = netns_labels(&text);
    assert!(
        labels.len() <= live() + 2,
        "series of gone namespaces remain: {labels:?}"
    );
    let grown_kb = vm_rss_kb(serve.pid()).saturating_sub(rss_before);
    assert!(
        grown_kb < 8 * 1024,
        "serve grew {grown_kb} kB over 500 namespaces"
    );
}

/// Removes the cgroup directories (innermost first) when dropped.
struct Cgroups(Vec<std::path::PathBuf>);

impl Drop for Cgroups {
    fn drop(&mut self) {
        for d in self.0.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// A process in a cgroup shaped like the kubelet's (systemd driver, Burstable QoS) and in a
/// network namespace of its own: report names its pod (UID and QoS class) and its container
/// from the cgroup path alone, and names the namespace after the pod.
#[test]
fn pods_are_named_from_kubelet_cgroup_paths() {
    require_root();
    // Alone: a namespace another test made and removed meanwhile can hand its inode number to
    // the pod's, and the report's namespace group would count both (18 for 9, once on 6.1).
    let _g = exclusive();
    let root = twtrace::host::cgroup::cgroup2_mount().expect("a cgroup2 mount");
    let uid = format!("7c0a1e3b-5d2f-4a6b-9c8d-{:012x}", std::process::id());
    let id = format!("3f2a9c1b7d0e{}", "a".repeat(52));
    let mut dirs = Vec::new();
    let mut dir = root.clone();
    for part in [
        "kubepods.slice".to_owned(),
        "kubepods-burstable.slice".to_owned(),
        format!("kubepods-burstable-pod{}.slice", uid.replace('-', "_")),
        format!("cri-containerd-{id}.scope"),
    ] {
        dir.push(part);
        if !dir.exists() {
            std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            dirs.push(dir.clone());
        }
    }
    let _cleanup = Cgroups(dirs);
    let churn = churn_bin();
    let churn = churn.to_str().unwrap();
    let port = unique_port();
    let report = Run::start(
        &[
            "report",
            "--json",
            "--duration",
            UNTIL_INTERRUPTED,
            "--by",
            "process",
        ],
        "collecting",
    );
    let by_netns = Run::start(
        &[
            "report",
            "--json",
            "--duration",
            UNTIL_INTERRUPTED,
            "--by",
            "netns",
        ],
        "collecting",
    );
    // The shell moves itself into the container's cgroup, then a new network namespace keeps
    // the server (serving while its stdin is open), the client and a sleeper (which keeps the
    // namespace alive for the reports); `done` once the client is.
    let script = format!(
        "echo $$ > {procs} && exec unshare -n sh -c 'ip link set lo up && \
         (sleep 60 | {churn} server --listen 127.0.0.1:{port} >/dev/null & sleep 0.5; \
          {churn} client --to 127.0.0.1:{port} --count 9 --name podclient >/dev/null; \
          echo done; sleep 60)'",
        procs = dir.join("cgroup.procs").display()
    );
    use std::os::unix::process::CommandExt;
    let mut pod = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(pod.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "done", "the traffic ran");
    // `unshare` exec'd: the shell's pid is in the pod's namespace.
    assert_eq!(wait_for(9, || sockstat_tw_of(pod.id())), 9);
    let r = json(&report.interrupt(Duration::from_secs(30)));
    let n = json(&by_netns.interrupt(Duration::from_secs(30)));
    // SAFETY: kills the process group the pod's shell leads (its server and sleeper too).
    unsafe { libc::kill(-(pod.id() as i32), libc::SIGKILL) };
    let _ = pod.wait();
    let row = r["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"].as_str().unwrap().starts_with("podclient["))
        .unwrap_or_else(|| panic!("no podclient row: {r}"));
    assert_eq!(row["entered"], 9, "{r}");
    assert_eq!(row["unit"], "container 3f2a9c1b7d0e");
    assert_eq!(row["pod"]["uid"], uid.as_str());
    assert_eq!(row["pod"]["qos"], "burstable");
    assert_eq!(row["pod"]["container"], "3f2a9c1b7d0e");
    let pod_ns = format!("pod {uid}");
    let g = n["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["netns"]["name"] == pod_ns.as_str())
        .unwrap_or_else(|| panic!("no namespace named {pod_ns}: {n}"));
    assert_eq!(g["entered"], 9);
    assert_eq!(g["in_time_wait"], 9);
}
