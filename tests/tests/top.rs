//! `twtrace top` in a real terminal: tmux drives it (send-keys) and reads it (capture-pane).

use std::{
    process::Command,
    thread,
    time::{Duration, Instant},
};

use twtrace_tests::*;

struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(cmd: &str) -> Self {
        Self::sized(cmd, 80)
    }

    fn sized(cmd: &str, width: u16) -> Self {
        // One tmux server per terminal: the tests run in parallel.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let socket = format!("twt-top-{}-{n}", std::process::id());
        run(Command::new("tmux").args([
            "-L",
            &socket,
            "new-session",
            "-d",
            "-x",
            &width.to_string(),
            "-y",
            "24",
            "-s",
            "t",
            cmd,
        ]));
        Tmux { socket }
    }

    fn screen(&self) -> String {
        run(Command::new("tmux").args(["-L", &self.socket, "capture-pane", "-p", "-t", "t"]))
    }

    fn keys(&self, keys: &str) {
        run(Command::new("tmux").args(["-L", &self.socket, "send-keys", "-t", "t", keys]));
    }

    fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = self.screen();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "no {what} on screen:\n{s}");
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .status();
    }
}

#[test]
fn top_shows_the_rows_and_restores_the_terminal_on_q() {
    require_root();
    let _g = shared();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &[]);
    let cmd = format!(
        "{} top --by peer --port {port}; echo \"top exited $?\"; sleep 60",
        twtrace_bin().display()
    );
    let tmux = Tmux::new(&cmd);
    tmux.wait_for("top's title", |s| s.contains("twtrace top  by peer"));
    let run = client(
        None,
        &["--to", &addr, "--count", "9", "--name", "twt-top-client"],
    );
    let screen = tmux.wait_for("the peer's row", |s| {
        s.lines()
            .any(|l| l.starts_with(&addr) && l.split_whitespace().nth(1) == Some("9"))
    });
    let row = screen.lines().find(|l| l.starts_with(&addr)).unwrap();
    assert!(
        row.contains(&format!("twt-top-client[{}]", run.pid)),
        "{row}"
    );
    assert!(screen.lines().count() <= 24);
    // g switches the grouping to port: the row is then the client's ports, not the peer.
    tmux.keys("g");
    tmux.wait_for("the port grouping", |s| s.contains("by port"));
    tmux.keys("q");
    let after = tmux.wait_for("the exit", |s| s.contains("top exited"));
    assert!(after.contains("top exited 0"), "{after}");
    assert!(
        !after.contains("twtrace top  by"),
        "the alternate screen is gone:\n{after}"
    );
}

/// SIGTERM, SIGINT (from kill) and SIGHUP: top exits 0 and the terminal is restored.
#[test]
fn top_restores_the_terminal_on_each_signal() {
    require_root();
    let _g = shared();
    for sig in ["TERM", "INT", "HUP"] {
        let cmd = format!(
            "{} top; echo \"top exited $?\"; sleep 60",
            twtrace_bin().display()
        );
        let tmux = Tmux::new(&cmd);
        tmux.wait_for("top's title", |s| s.contains("twtrace top"));
        let shell = run(Command::new("tmux").args([
            "-L",
            &tmux.socket,
            "list-panes",
            "-t",
            "t",
            "-F",
            "#{pane_pid}",
        ]));
        let pid = run(Command::new("pgrep").args(["-P", shell.trim(), "twtrace"]));
        run(Command::new("kill").args([&format!("-{sig}"), pid.trim()]));
        let after = tmux.wait_for("the exit", |s| s.contains("top exited"));
        assert!(after.contains("top exited 0"), "SIG{sig}: {after}");
        assert!(
            !after.contains("twtrace top"),
            "SIG{sig}: the alternate screen is gone:\n{after}"
        );
    }
}

/// A terminal narrower than 80 columns: the key keeps its width and the owner its column;
/// the less telling figures go. Esc clears a filter and does not quit.
#[test]
fn top_in_64_columns_keeps_the_key_and_the_owner() {
    require_root();
    let _g = shared();
    let port = unique_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = Server::start(None, &addr, &[]);
    let cmd = format!(
        "{} top --by peer --port {port}; echo \"top exited $?\"; sleep 60",
        twtrace_bin().display()
    );
    let tmux = Tmux::sized(&cmd, 64);
    tmux.wait_for("top's title", |s| s.contains("twtrace top  by peer"));
    let run = client(
        None,
        &["--to", &addr, "--count", "3", "--name", "twt-narrow"],
    );
    let owner = format!("twt-narrow[{}]", run.pid);
    let screen = tmux.wait_for("the peer's row", |s| {
        s.lines()
            .any(|l| l.starts_with(&addr) && l.contains(&owner))
    });
    assert!(screen.contains("OWNER"), "{screen}");
    assert!(!screen.contains("P50"), "P50 goes first:\n{screen}");
    tmux.keys("/");
    tmux.keys("nomatch");
    tmux.keys("Enter");
    tmux.wait_for("the filter", |s| s.contains("filter: nomatch"));
    tmux.keys("Escape");
    let screen = tmux.wait_for("the filter cleared", |s| {
        !s.contains("filter: nomatch") && s.lines().any(|l| l.starts_with(&addr))
    });
    assert!(
        !screen.contains("top exited"),
        "Esc does not quit:\n{screen}"
    );
    tmux.keys("q");
    let after = tmux.wait_for("the exit", |s| s.contains("top exited"));
    assert!(after.contains("top exited 0"), "{after}");
}
