//! What a new user meets on the command line: times in local time, output paths checked before
//! the run, process names that cannot reach the terminal raw, honest closing lines, messages
//! that repeat what was typed, exit codes that say one thing each, and the conventions people
//! look for (`--new-only`, `report --interval` and `--output`, `doctor --fail-on`,
//! `exec --summary`).

use std::{
    process::{Command, Output},
    thread,
    time::{Duration, SystemTime},
};

use serde_json::Value;
use twtrace_tests::*;

fn twtrace(args: &[&str]) -> Output {
    Command::new(twtrace_bin()).args(args).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Local time by default (TZ, as date(1)), `--utc`, `--time iso` and `--time epoch`.
#[test]
fn watch_prints_local_time_or_what_is_asked() {
    require_root();
    let _g = shared();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &[]);
    let tz = "Asia/Kathmandu";
    // One ENTER line per run, its time column.
    let p = port.to_string();
    let time_of = |extra: &[&str]| -> (String, f64, f64) {
        let mut args = vec!["watch", "--port", p.as_str()];
        args.extend_from_slice(extra);
        let before = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let mut cmd = Command::new(twtrace_bin());
        cmd.args(&args).env("TZ", tz);
        let w = Run::spawn(cmd, "tracing TIME_WAIT");
        client(None, &["--to", &addr, "--count", "1"]);
        thread::sleep(Duration::from_millis(500));
        // SAFETY: signalling a child of this test.
        unsafe { libc::kill(w.pid() as i32, libc::SIGINT) };
        let out = w.finish(Duration::from_secs(10));
        let after = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let line = out
            .stdout
            .lines()
            .find(|l| l.contains(" ENTER "))
            .unwrap_or_else(|| panic!("{}", out.stdout))
            .to_owned();
        (line.split(' ').next().unwrap().to_owned(), before, after)
    };
    let (iso, ..) = time_of(&["--time", "iso"]);
    assert!(iso.ends_with("+05:45"), "{iso}");
    assert_eq!(iso.len(), "2026-11-30T20:38:19.373+05:45".len(), "{iso}");
    let (utc, ..) = time_of(&["--utc", "--time", "iso"]);
    assert!(utc.ends_with("+00:00"), "{utc}");
    let (epoch, before, after) = time_of(&["--time", "epoch"]);
    let t: f64 = epoch.parse().unwrap_or_else(|_| panic!("{epoch}"));
    assert!(
        before - 1.0 <= t && t <= after + 1.0,
        "{before} <= {t} <= {after}"
    );
    // The default: HH:MM:SS.mmm in TZ, the same clock date(1) shows there.
    let hour = |cmd: &str| {
        run(Command::new("date").env("TZ", tz).arg(cmd))
            .trim()
            .to_owned()
    };
    let h0 = hour("+%H:%M");
    let (clock, ..) = time_of(&[]);
    let h1 = hour("+%H:%M");
    assert_eq!(clock.len(), 12, "{clock}");
    assert!(
        clock[..5] == h0 || clock[..5] == h1,
        "{clock} is not {tz}'s time ({h0}..{h1})"
    );
}

/// An output path that cannot be written is bad usage found at once (exit 2), before
/// anything is attached: not after the whole run.
#[test]
fn unwritable_output_paths_are_refused_before_the_run() {
    require_root();
    let _g = exclusive();
    let before = quiet_programs();
    let bad = "/nonexistent-twt/out.json";
    for (args, option) in [
        (
            vec!["watch", "--duration", "3s", "--stats-json", bad],
            "--stats-json",
        ),
        (
            vec!["report", "--duration", "3s", "--output", bad],
            "--output",
        ),
        (
            vec!["doctor", "--duration", "3s", "--stats-json", bad],
            "--stats-json",
        ),
    ] {
        let out = twtrace(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!("{option} {bad}: cannot write there")),
            "{err}"
        );
        assert_eq!(settled_programs(before), before);
    }
    // exec's own failures are 125, apart from the command's codes.
    let out = twtrace(&["exec", "--summary", bad, "--", "true"]);
    assert_eq!(out.status.code(), Some(125), "{}", stderr(&out));
    assert!(stderr(&out).contains("--summary"), "{}", stderr(&out));
}

/// A process named with an escape sequence and a newline: watch's line and the report's table
/// show it escaped, on one line.
#[test]
fn process_names_are_escaped_for_the_terminal() {
    require_root();
    let _g = shared();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &[]);
    let p = port.to_string();
    let w = Run::start(&["watch", "--port", &p], "tracing TIME_WAIT");
    let rep = Run::start(
        &[
            "report",
            "--duration",
            "3s",
            "--port",
            &p,
            "--by",
            "process",
        ],
        "collecting",
    );
    let run = client(
        None,
        &["--to", &addr, "--count", "1", "--name", "\x1b[31mx\ny"],
    );
    thread::sleep(Duration::from_millis(500));
    // SAFETY: signalling a child of this test.
    unsafe { libc::kill(w.pid() as i32, libc::SIGINT) };
    let watch = w.finish(Duration::from_secs(10)).stdout;
    let report = rep.finish(Duration::from_secs(20)).stdout;
    let name = format!("\\e[31mx\\ny[{}]", run.pid);
    for (what, text) in [("watch", &watch), ("report", &report)] {
        assert!(!text.contains('\x1b'), "{what}: {text:?}");
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(&format!("[{}]", run.pid)) || l.contains("\\e[31m"))
            .collect();
        assert_eq!(lines.len(), 1, "{what}: {text}");
        if what == "report" {
            assert!(lines[0].starts_with(&name), "{}", lines[0]);
        } else {
            assert!(lines[0].contains("\\e[31mx\\ny"), "{}", lines[0]);
        }
    }
}

/// watch's closing line counts what it showed when filters left traffic out.
#[test]
fn watch_summary_counts_what_was_shown() {
    require_root();
    let _g = shared();
    let (port, other) = (unique_port(), unique_port());
    let addr = format!("127.0.0.1:{port}");
    let other_addr = format!("127.0.0.1:{other}");
    let _s1 = Server::start(None, &addr, &[]);
    let _s2 = Server::start(None, &other_addr, &[]);
    let p = port.to_string();
    let w = Watch::start(&["--port", &p]);
    client(None, &["--to", &addr, "--count", "6"]);
    client(None, &["--to", &other_addr, "--count", "9"]);
    let mut seen = Vec::new();
    w.wait_until(Duration::from_secs(10), &mut seen, |e| e.len() >= 6);
    let r = w.stop_with(libc::SIGINT, seen);
    assert_eq!(r.events.len(), 6);
    assert!(
        r.stderr
            .contains("twtrace: 6 TIME_WAIT births and 0 ends shown (of "),
        "{}",
        r.stderr
    );
}

/// Values are refused as they were typed: a multi-byte name cut by the kernel, a v4-mapped
/// network, a ring buffer too large for its worth.
#[test]
fn messages_repeat_what_was_typed() {
    for (args, needle) in [
        (
            vec!["watch", "--comm", "ééééééééé"],
            "the first 15 of a process name: use 'ééééééé?'",
        ),
        (
            vec!["watch", "--peer", "::ffff:10.0.0.0/96"],
            "'::ffff:10.0.0.0/96' has host bits set; did you mean ::ffff:0.0.0.0/96?",
        ),
        (
            vec!["watch", "--ring-size", "1GiB"],
            "'1GiB': the ring buffer size must be a power of two from 4KiB to 256MiB",
        ),
        (
            vec!["serve", "--listen", ":0"],
            "':0' is not an address to listen on",
        ),
        (
            vec!["doctor", "--fail-on", "info"],
            "'info' is not a severity",
        ),
        (
            vec!["watch", "--time", "local"],
            "'local' is not a time format",
        ),
    ] {
        let out = twtrace(&args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("10.0.0.0/0"), "{err}");
    }
}

/// exec's codes never collide with its command's: 124 budget exceeded, 125 twtrace failed,
/// 126 cannot run, 127 not found; the command's own status otherwise (3 stays 3).
#[test]
fn exec_exit_codes_stand_apart_from_the_command_s() {
    require_root();
    let _g = shared();
    let code = |args: &[&str]| {
        let out = twtrace(args);
        (out.status.code(), stderr(&out))
    };
    let (c, e) = code(&["exec", "--", "/nonexistent-twt-command"]);
    assert_eq!(c, Some(127), "{e}");
    assert!(e.contains("cannot run '/nonexistent-twt-command'"), "{e}");
    let dir = TempDir::new("noexec");
    let script = dir.0.join("script");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    let (c, e) = code(&["exec", "--", script.to_str().unwrap()]);
    assert_eq!(c, Some(126), "{e}");
    let (c, e) = code(&["exec", "--max-rate", "0", "--", "true"]);
    assert_eq!(c, Some(125), "{e}");
    assert!(e.contains("'0'"), "{e}");
    let (c, e) = code(&["exec", "--", "sh", "-c", "exit 3"]);
    assert_eq!(c, Some(3), "{e}");
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &[]);
    let churn = churn_bin();
    let (c, e) = code(&[
        "exec",
        "--max-timewait",
        "2",
        "--",
        churn.to_str().unwrap(),
        "client",
        "--to",
        &addr,
        "--count",
        "5",
    ]);
    assert_eq!(c, Some(124), "{e}");
    assert!(e.contains("BUDGET: --max-timewait 2 exceeded"), "{e}");
}

/// `exec --summary FILE`: the summary goes there, the command's stderr stays its own; the text
/// summary names peers and local ports.
#[test]
fn exec_summary_goes_to_its_file() {
    require_root();
    let _g = shared();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &[]);
    let dir = TempDir::new("summary");
    let file = dir.0.join("summary.txt");
    let churn = churn_bin();
    let out = twtrace(&[
        "exec",
        "--summary",
        file.to_str().unwrap(),
        "--",
        "sh",
        "-c",
        &format!(
            "{} client --to {addr} --count 4 >/dev/null; echo own-stderr >&2",
            churn.display()
        ),
    ]);
    assert_eq!(out.status.code(), Some(0));
    // Under lockdown=confidentiality, twtrace's one line on what it cannot see comes first.
    let limits = if confidentiality() {
        confidentiality_line()
    } else {
        String::new()
    };
    assert_eq!(stderr(&out), format!("{limits}own-stderr\n"));
    let summary = std::fs::read_to_string(&file).unwrap();
    assert!(summary.contains("TIME_WAIT caused: 4"), "{summary}");
    assert!(summary.contains(&format!("  to {addr}: 4")), "{summary}");
    assert!(summary.contains("  from local port "), "{summary}");
}

/// `--new-only` leaves out the end of a TIME_WAIT born before watch started; without it, that
/// end is shown (`lifetime_ms` null).
#[test]
fn new_only_leaves_out_sockets_born_before_start() {
    require_root();
    let _g = shared();
    for new_only in [false, true] {
        let ns = Netns::new("new");
        ns.sysctl("net.ipv4.tcp_tw_reuse", "2");
        let (port, cport) = (unique_port(), unique_port());
        let server_addr = format!("127.0.0.1:{port}");
        let bind = format!("127.0.0.1:{cport}");
        let _server = Server::start(Some(&ns), &server_addr, &[]);
        let once = [
            "--to",
            server_addr.as_str(),
            "--count",
            "1",
            "--bind",
            bind.as_str(),
        ];
        client(Some(&ns), &once);
        thread::sleep(Duration::from_millis(1200));
        let p = port.to_string();
        let mut args = vec!["--port", p.as_str()];
        if new_only {
            args.push("--new-only");
        }
        let w = Watch::start(&args);
        // Reuses the port: the TIME_WAIT born before watch ends now.
        client(Some(&ns), &once);
        let mut seen = Vec::new();
        w.wait_until(Duration::from_secs(5), &mut seen, |e| {
            e.iter().any(|e| e["event"] == "tw_enter")
        });
        let r = w.stop_with(libc::SIGINT, seen);
        let exits: Vec<&Value> = r.of_kind("tw_exit").collect();
        // Under lockdown=confidentiality a TIME_WAIT born before start cannot be matched to its
        // timer: its end is not seen now (it is taken as expired at its deadline, a minute on).
        if new_only || confidentiality() {
            assert!(exits.is_empty(), "{:?}", r.events);
        } else {
            assert_eq!(exits.len(), 1, "{:?}", r.events);
            assert!(exits[0]["lifetime_ms"].is_null());
        }
        assert_eq!(r.of_kind("tw_enter").count(), 1);
    }
}

/// `report --interval 1s`: one JSON document per interval, each about its interval, and
/// `--output FILE` takes them instead of standard output.
#[test]
fn report_repeats_at_an_interval_into_a_file() {
    require_root();
    let _g = shared();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &[]);
    let dir = TempDir::new("interval");
    let file = dir.0.join("reports.jsonl");
    let p = port.to_string();
    let r = Run::start(
        &[
            "report",
            "--interval",
            "2s",
            "--duration",
            "5s",
            "--json",
            "--port",
            &p,
            "--output",
            file.to_str().unwrap(),
        ],
        "collecting",
    );
    client(None, &["--to", &addr, "--count", "7"]);
    let out = r.finish(Duration::from_secs(20));
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout, "", "everything went to the file");
    let text = std::fs::read_to_string(&file).unwrap();
    let docs: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    // At 2 s, 4 s, and the last second at the end.
    assert_eq!(docs.len(), 3, "{text}");
    let births: u64 = docs
        .iter()
        .map(|d| d["totals"]["entered"].as_u64().unwrap())
        .sum();
    assert_eq!(births, 7, "each birth in exactly one interval: {text}");
    for d in &docs[..2] {
        let s = d["duration_s"].as_f64().unwrap();
        assert!((1.5..3.0).contains(&s), "an interval's report: {s}");
    }
    // TIME_WAIT now is the same in each (nothing ends within a minute).
    assert!(
        docs.iter().all(|d| d["totals"]["in_time_wait"] == 7),
        "{text}"
    );
}

/// `doctor --fail-on`: a warning fails the default run (exit 9, not 1 which is an error), and
/// passes `--fail-on critical`; the text output escapes the process's name.
#[test]
fn doctor_fails_on_the_severity_asked_for() {
    require_root();
    let _g = exclusive();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &["--hold", "--name", "leak\x1b[2Jy"]);
    // Windows that end once the 20 are in CLOSE_WAIT, however slow the machine (a fixed 4 s
    // was too short for an emulated 6.1).
    let default = Run::start(
        &["doctor", "--duration", UNTIL_INTERRUPTED, "--json"],
        "watching",
    );
    let critical = Run::start(
        &[
            "doctor",
            "--duration",
            UNTIL_INTERRUPTED,
            "--fail-on",
            "critical",
        ],
        "watching",
    );
    client(None, &["--to", &addr, "--count", "20", "--hold"]);
    let d = default.interrupt(Duration::from_secs(60));
    let c = critical.interrupt(Duration::from_secs(60));
    let doc: Value = serde_json::from_str(&d.stdout).unwrap();
    let worst = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["severity"].as_str().unwrap().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(d.status.code(), Some(9), "{worst:?} {}", d.stderr);
    if !worst.iter().any(|s| s == "critical") {
        assert_eq!(c.status.code(), Some(0), "{worst:?}: {}", c.stderr);
    }
    assert!(!c.stdout.contains('\x1b'), "{:?}", c.stdout);
    assert!(c.stdout.contains("leak\\e[2Jy["), "{}", c.stdout);
}

/// The README and `--help` name every exit code, each with one meaning.
#[test]
fn exit_codes_are_documented_in_help_and_readme() {
    let help = String::from_utf8_lossy(&twtrace(&["--help"]).stdout).into_owned();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let table: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("## Exit codes"))
        .take_while(|l| !l.starts_with("## Network"))
        .filter(|l| l.starts_with("| "))
        .collect();
    for code in [
        "0", "1", "2", "4", "5", "6", "7", "8", "9", "101", "124", "125", "126", "127",
    ] {
        assert!(
            table.iter().any(|l| l.starts_with(&format!("| {code} |"))),
            "README's table lacks {code}: {table:?}"
        );
        assert!(
            help.contains(&format!("{code} ")),
            "--help lacks {code}: {help}"
        );
    }
    assert!(
        !table.iter().any(|l| l.starts_with("| 3 |")),
        "3 is no longer used: {table:?}"
    );
    // The conventions are in --help.
    for (cmd, opt) in [
        ("watch", "--new-only"),
        ("watch", "--utc"),
        ("watch", "--time"),
        ("report", "--interval"),
        ("report", "--output"),
        ("doctor", "--fail-on"),
        ("exec", "--summary"),
        ("serve", "--log-level"),
    ] {
        let h = String::from_utf8_lossy(&twtrace(&[cmd, "--help"]).stdout).into_owned();
        assert!(h.contains(opt), "{cmd} --help lacks {opt}");
        assert!(readme.contains(opt), "README lacks {opt}");
    }
    // Documented: the `(?)` role, the report JSON's `lost` object.
    assert!(readme.contains("`(?)`"), "README lacks the (?) role");
    assert!(
        readme.contains("`lost`"),
        "README lacks the report's lost object"
    );
}
