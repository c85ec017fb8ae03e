//! Every view's way out: SIGINT, SIGTERM and SIGHUP end each run cleanly (exit 0, what was
//! collected said, nothing left attached), a reader that closes the pipe ends it quietly (no
//! panic when standard error is that pipe too), and `exec` passes signals on to its command,
//! waits for it and exits with its status.

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use twtrace_tests::*;

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "?",
    }
}

fn kill(pid: u32, sig: i32) {
    // SAFETY: signalling a child of this test.
    unsafe { libc::kill(pid as i32, sig) };
}

fn no_panic(stderr: &str) {
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `twtrace exec -- CMD`, sent `sig` once CMD runs: CMD gets it, twtrace prints its summary and
/// exits with CMD's status (128 + the signal), never a panic.
#[test]
fn exec_passes_each_signal_on_and_exits_with_the_command_s_status() {
    require_root();
    let _g = shared();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let r = Run::start(
            &[
                "exec",
                "--",
                "sh",
                "-c",
                "echo command-started >&2; exec sleep 20",
            ],
            "command-started",
        );
        kill(r.pid(), sig);
        let out = r.finish(Duration::from_secs(15));
        no_panic(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(128 + sig),
            "{}: {}",
            signal_name(sig),
            out.stderr
        );
        assert!(
            out.stderr.contains(&format!(
                "twtrace exec: 'sh -c echo command-started >&2; exec sleep 20' exited {}",
                128 + sig
            )),
            "{}: {}",
            signal_name(sig),
            out.stderr
        );
    }
}

/// A command that ignores SIGTERM and SIGINT keeps twtrace waiting: it finishes its work, and
/// twtrace exits with its status after it, summary printed.
#[test]
fn exec_waits_for_a_command_that_ignores_the_signals() {
    require_root();
    let _g = shared();
    let r = Run::start(
        &[
            "exec",
            "--",
            "sh",
            "-c",
            "trap '' TERM INT; echo command-started >&2; sleep 3; echo still-running",
        ],
        "command-started",
    );
    kill(r.pid(), libc::SIGTERM);
    thread::sleep(Duration::from_millis(300));
    kill(r.pid(), libc::SIGINT);
    let out = r.finish(Duration::from_secs(20));
    no_panic(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert_eq!(out.stdout, "still-running\n");
    assert!(out.stderr.contains("exited 0 after"), "{}", out.stderr);
}

/// watch, report, serve and doctor: each of SIGINT, SIGTERM and SIGHUP ends the run with exit
/// 0 and its closing words; every program is detached.
#[test]
fn every_view_ends_cleanly_on_sigint_sigterm_and_sighup() {
    require_root();
    let _g = exclusive();
    let before = quiet_programs();
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let http = format!("127.0.0.1:{}", unique_port());
        let views: [(&[&str], &str, &str); 4] = [
            (&["watch"], "tracing TIME_WAIT", "events lost"),
            (
                &["report", "--duration", "60s"],
                "collecting",
                "TIME_WAIT births",
            ),
            (&["serve", "--listen", &http], "serving on", "events lost"),
            (
                &["doctor", "--duration", "60s", "--fail-on", "never"],
                "watching",
                "twtrace doctor: watched",
            ),
        ];
        for (args, ready, closing) in views {
            let r = Run::start(args, ready);
            kill(r.pid(), sig);
            let out = r.finish(Duration::from_secs(20));
            let what = format!("{} on {}", signal_name(sig), args[0]);
            no_panic(&out.stderr);
            assert_eq!(out.status.code(), Some(0), "{what}: {}", out.stderr);
            assert!(
                out.stderr.contains(closing) || out.stdout.contains(closing),
                "{what}: no '{closing}' in\n{}{}",
                out.stdout,
                out.stderr
            );
            assert_eq!(settled_programs(before), before, "{what}");
        }
    }
}

/// A pipeline reader that leaves: `watch 2>&1 | head -1` ends quietly (standard error is the
/// closed pipe too), `report | true` and `doctor | true` exit 0 without a word.
#[test]
fn a_closed_pipe_ends_each_view_quietly() {
    require_root();
    let _g = shared();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &[]);
    let bin = twtrace_bin();
    let bin = bin.display();
    let mut watch = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{bin} watch --port {port} 2>&1 | head -1; echo \"watch exited ${{PIPESTATUS[0]}}\""
        ))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // head has its line (the header) and leaves; the next event's write meets the closed pipe.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        client(None, &["--to", &addr, "--count", "2"]);
        if let Some(s) = watch.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "watch did not notice the closed pipe"
        );
        thread::sleep(Duration::from_millis(200));
    };
    assert!(status.success());
    let mut out = String::new();
    std::io::Read::read_to_string(&mut watch.stdout.take().unwrap(), &mut out).unwrap();
    assert!(out.contains("watch exited 0"), "{out}");
    for view in [
        "report --duration 1s",
        "doctor --duration 1s --fail-on never",
    ] {
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "{bin} {view} 2>err-$$ | true; s=${{PIPESTATUS[0]}}; cat err-$$ >&2; rm -f err-$$; \
                 exit $s"
            ))
            .current_dir(std::env::temp_dir())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        no_panic(&stderr);
        assert_eq!(out.status.code(), Some(0), "{view}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "{view}: {stderr}");
    }
}

/// `watch > /dev/full`: the failure names standard output (exit 1), and the summary is still
/// said.
#[test]
fn a_full_standard_output_is_named() {
    require_root();
    let _g = shared();
    let out = Command::new(twtrace_bin())
        .args(["watch", "--duration", "2s"])
        .stdout(
            std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/full")
                .unwrap(),
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("twtrace: cannot write to standard output: No space left on device"),
        "{stderr}"
    );
    assert!(stderr.contains("events lost"), "{stderr}");
}

/// Ctrl-C in a terminal: the kernel sends SIGINT to the whole foreground process group, the
/// command included, so exec does not send it again (a command that counts its SIGINTs, as
/// "a second Ctrl-C forces" programs do, sees one).
#[test]
fn exec_does_not_double_a_terminal_s_ctrl_c() {
    require_root();
    let _g = shared();
    let dir = TempDir::new("ctrlc");
    let script = dir.0.join("count.py");
    std::fs::write(
        &script,
        "import signal, sys, time\n\
         n = [0]\n\
         signal.signal(signal.SIGINT, lambda *a: n.__setitem__(0, n[0] + 1))\n\
         print('command-ready', flush=True)\n\
         end = time.time() + 4\n\
         while time.time() < end:\n    time.sleep(0.1)\n\
         print('INT', n[0], flush=True)\n",
    )
    .unwrap();
    let socket = format!("twt-ctrlc-{}", std::process::id());
    let tmux = |args: &[&str]| run(Command::new("tmux").arg("-L").arg(&socket).args(args));
    let cmd = format!(
        // The shell ignores the Ctrl-C itself, to be there to say how exec ended.
        "trap '' INT; {} exec -- python3 {}; echo \"exec exited $?\"; sleep 60",
        twtrace_bin().display(),
        script.display()
    );
    tmux(&[
        "new-session",
        "-d",
        "-x",
        "100",
        "-y",
        "30",
        "-s",
        "t",
        &cmd,
    ]);
    let screen = || tmux(&["capture-pane", "-p", "-t", "t"]);
    let wait = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = screen();
            if s.contains(what) {
                return s;
            }
            assert!(Instant::now() < deadline, "no {what}:\n{s}");
            thread::sleep(Duration::from_millis(100));
        }
    };
    wait("command-ready");
    tmux(&["send-keys", "-t", "t", "C-c"]);
    let s = wait("exec exited");
    let _ = Command::new("tmux")
        .args(["-L", &socket, "kill-server"])
        .status();
    assert!(s.contains("INT 1"), "one SIGINT, not two:\n{s}");
    assert!(s.contains("exec exited 0"), "{s}");
}
