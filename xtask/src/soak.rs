//! `cargo +stable xtask soak [--minutes N] [--rate R]`: a long, bounded run at steady churn
//! with `twtrace serve` attached, sampling what must stay flat: its RSS, the kernel's owner map,
//! and whether its counts still match the kernel's own counters. Prints the figures and writes
//! them to target/soak/latest.json. Not part of the default test run (it takes minutes).

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::{build_release_bins, root, setup, status};

const NS: &str = "twt-soak";
const SERVER: &str = "127.0.0.1:7300";
const HTTP: &str = "127.0.0.1:19300";

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", NS]).status();
    }
}

fn status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn http_get(path: &str) -> Option<String> {
    let mut s = TcpStream::connect(HTTP).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// The first number after `"key":` in a JSON text (xtask has no JSON parser; the documents
/// are ours and simple).
fn json_num(doc: &str, key: &str) -> Option<u64> {
    let i = doc.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = doc[i..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Births towards the soak's server since serve started: its `peer` group in the report (the
/// host's other TIME_WAIT, such as the samples' own HTTP requests to serve, do not count).
fn births(doc: &str) -> u64 {
    let Some(k) = doc.find(&format!("\"key\":\"{SERVER}\"")) else {
        return 0;
    };
    // The group object holds its keys in order: its "entered" is the last one before "key"
    // (the objects nested between them, "exits", have none).
    doc[..k]
        .rfind("\"entered\":")
        .and_then(|start| json_num(&doc[start..k], "entered"))
        .unwrap_or(0)
}

fn owner_entries() -> u64 {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "name", "OWNERS"])
        .output();
    let Ok(out) = out else { return 0 };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(id) = json_num(&text, "id") else {
        return 0;
    };
    let dump = Command::new("bpftool")
        .args(["-j", "map", "dump", "id", &id.to_string()])
        .output();
    dump.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .matches("\"key\"")
            .count() as u64
    })
    .unwrap_or(0)
}

fn tcpext_tw() -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", NS, "cat", "/proc/net/netstat"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    if lines.len() < 2 {
        return 0;
    }
    let names: Vec<&str> = lines[0].split_whitespace().collect();
    let values: Vec<&str> = lines[1].split_whitespace().collect();
    names
        .iter()
        .position(|&n| n == "TW")
        .and_then(|i| values.get(i)?.parse().ok())
        .unwrap_or(0)
}

pub fn run(args: &[String]) -> Result<(), String> {
    let mut minutes = 10u64;
    let mut rate = 500u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut num = |max: u64| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|&v| v > 0 && v <= max)
                .ok_or(format!("{a} needs a number from 1 to {max}"))
        };
        match a.as_str() {
            "--minutes" => minutes = num(60)?,
            "--rate" => rate = num(20_000)?,
            other => return Err(format!("soak: unknown argument {other}")),
        }
    }
    setup::ensure(setup::Need::Test)?;
    let bin = build_release_bins()?;
    let twtrace = bin.join("twtrace");
    let churn = bin.join("twt-churn");

    let _ = Command::new("ip").args(["netns", "del", NS]).status();
    status(Command::new("ip").args(["netns", "add", NS]))?;
    status(Command::new("ip").args(["netns", "exec", NS, "ip", "link", "set", "lo", "up"]))?;
    let mut children = Killed(Vec::new());
    let server = Command::new("ip")
        .args(["netns", "exec", NS])
        .arg(&churn)
        .args(["server", "--listen", SERVER])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    children.0.push(server);
    let serve = Command::new(&twtrace)
        .args(["serve", "--listen", HTTP])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let pid = serve.id();
    children.0.push(serve);
    thread::sleep(Duration::from_secs(2));
    let tw_start = tcpext_tw();

    let total = Duration::from_secs(minutes * 60);
    let started = Instant::now();
    println!("soak: {minutes} min at {rate} connections/s (10 % reset, 10 % abandoned), sampling every 10 s");
    println!(
        "{:>6} {:>9} {:>9} {:>10} {:>10}",
        "t (s)", "RSS KiB", "owners", "births", "kernel TW"
    );
    let mut samples: Vec<(u64, u64, u64, u64, u64)> = Vec::new();
    let mut gen: Option<Child> = None;
    let mut round = 0u64;
    while started.elapsed() < total {
        if gen
            .as_mut()
            .map_or(true, |g| g.try_wait().ok().flatten().is_some())
        {
            round += 1;
            // 9 of 10 rounds close normally; the others reset or abandon their connections.
            let extra: &[&str] = match round % 10 {
                0 => &["--linger0"],
                5 => &["--hold"],
                _ => &[],
            };
            let count = (rate * 10).to_string();
            let r = rate.to_string();
            gen = Some(
                Command::new("ip")
                    .args(["netns", "exec", NS])
                    .arg(&churn)
                    .args(["client", "--to", SERVER, "--count", &count, "--rate", &r])
                    .args(extra)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .map_err(|e| e.to_string())?,
            );
        }
        thread::sleep(Duration::from_secs(10).min(total.saturating_sub(started.elapsed())));
        let t = started.elapsed().as_secs();
        let rss = status_kb(pid, "VmRSS");
        let owners = owner_entries();
        let doc = http_get("/api/v1/report?by=peer&top=1000").unwrap_or_default();
        let born = births(&doc);
        let kernel = tcpext_tw().saturating_sub(tw_start);
        println!("{t:>6} {rss:>9} {owners:>9} {born:>10} {kernel:>10}");
        samples.push((t, rss, owners, born, kernel));
    }
    if let Some(mut g) = gen {
        let _ = g.kill();
        let _ = g.wait();
    }
    thread::sleep(Duration::from_secs(2));
    let doc = http_get("/api/v1/report?by=peer&top=1000").unwrap_or_default();
    let births = births(&doc);
    let lost = json_num(&doc, "lost_events").unwrap_or(0);
    let kernel = tcpext_tw().saturating_sub(tw_start);
    let peak_rss = status_kb(pid, "VmHWM");

    // Flat after warm-up: compare the first minute's RSS with the last sample's.
    let warm = samples.iter().find(|s| s.0 >= 60).or(samples.first());
    let last = samples.last();
    let (rss_warm, rss_end) = (warm.map_or(0, |s| s.1), last.map_or(0, |s| s.1));
    let owners_max = samples.iter().map(|s| s.2).max().unwrap_or(0);
    let owners_end = owner_entries();
    println!();
    println!("RSS after warm-up {rss_warm} KiB, at the end {rss_end} KiB, peak {peak_rss} KiB");
    println!("owner map: at most {owners_max} entries while running, {owners_end} at the end");
    println!(
        "births counted by twtrace {births}, TIME_WAIT created per the kernel (TcpExt TW) {kernel}, lost events {lost}"
    );
    let json = format!(
        "{{\"minutes\":{minutes},\"rate\":{rate},\"rss_kib_after_warmup\":{rss_warm},\"rss_kib_end\":{rss_end},\"rss_kib_peak\":{peak_rss},\"owners_max\":{owners_max},\"owners_end\":{owners_end},\"births\":{births},\"kernel_tw_created\":{kernel},\"lost_events\":{lost},\"samples\":[{}]}}",
        samples
            .iter()
            .map(|s| format!("[{},{},{},{},{}]", s.0, s.1, s.2, s.3, s.4))
            .collect::<Vec<_>>()
            .join(",")
    );
    let dir = root().join("target/soak");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("latest.json"), json).map_err(|e| e.to_string())?;
    println!("written to {}", dir.join("latest.json").display());
    // Ask serve to end cleanly.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    thread::sleep(Duration::from_millis(500));
    drop(children);
    Ok(())
}
