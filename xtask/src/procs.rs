//! Processes, every wait bounded (shared by the benchmark and vm-test): short commands run with a
//! time limit, waits that kill the child after theirs, signals, and a child that is killed when
//! dropped.

use std::{
    io::Read,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::setup;

/// Runs a short command with a time limit; stdout on success.
pub(crate) fn run_for(cmd: &mut Command, limit: Duration) -> Result<String, String> {
    output_for(cmd, limit).map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// Runs a short command with a time limit; stdout as bytes on success.
pub(crate) fn output_for(cmd: &mut Command, limit: Duration) -> Result<Vec<u8>, String> {
    capture(cmd, limit, Stdio::piped())
}

/// As `output_for`, with the command's stderr going to ours (cargo's progress, say).
pub(crate) fn stdout_for(cmd: &mut Command, limit: Duration) -> Result<Vec<u8>, String> {
    capture(cmd, limit, Stdio::inherit())
}

/// stdout on success; the error says why, with stderr when it was piped.
fn capture(cmd: &mut Command, limit: Duration, stderr: Stdio) -> Result<Vec<u8>, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    let out = byte_reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let status = wait_for(&mut child, limit, || {});
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    match status {
        Some(s) if s.success() => Ok(out),
        Some(s) => Err(format!("{what} failed ({s}): {}", err.trim())),
        None => Err(format!("{what} did not finish within {limit:?}: killed")),
    }
}

pub(crate) fn reader<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}

fn byte_reader<R: Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut b);
        }
        b
    })
}

/// Waits for a child up to `limit`, calling `tick` every 50 ms; kills it after the limit
/// (None).
pub(crate) fn wait_for(
    child: &mut Child,
    limit: Duration,
    mut tick: impl FnMut(),
) -> Option<ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(_) => break,
        }
        if Instant::now() >= end {
            break;
        }
        tick();
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

pub(crate) fn signal(pid: u32, sig: &str) {
    let _ = run_for(
        Command::new("kill").args(["-s", sig, &pid.to_string()]),
        Duration::from_secs(5),
    );
}

/// A child that is killed (SIGKILL) and reaped if it is still there when this is dropped.
pub(crate) struct Owned(pub(crate) Child);

impl Drop for Owned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub(crate) fn ip() -> PathBuf {
    setup::which("ip").unwrap_or_else(|| PathBuf::from("ip"))
}
