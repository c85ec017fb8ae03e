//! Command line: clap definitions and strict parsers. Every rejected value is named in the error.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::{
    present::report::Sort,
    track::aggregate::By,
    track::filter::{Cidr, Filter},
};

/// What `twtrace --version` prints after the name: the crate version, the git commit it was
/// built from and the start of the SHA-256 of the embedded kernel object (both from build.rs),
/// so that a bug report names exactly what ran.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("TWTRACE_GIT_COMMIT"),
    ", ebpf ",
    env!("TWTRACE_EBPF_SHA256"),
    ")"
);

/// The exit codes, for `--help` (README "Exit codes" is the full table).
pub const EXIT_CODES: &str = "Exit codes: 0 ok (also after Ctrl-C, SIGTERM, SIGHUP or a closed \
    pipe), 1 error, 2 bad usage, 4 missing privilege, 5 kernel lacks a feature, 7 the kernel \
    refused to load or attach, 8 serve cannot listen (address in use), \
    9 doctor found a problem (--fail-on), 101 a bug (twtrace panicked). exec passes on the \
    command's own status: 124 a budget was exceeded, 125 twtrace's own error or bad usage, 126 \
    the command cannot be run, 127 it was not found.";

#[derive(Parser, Debug)]
#[command(
    name = "twtrace",
    version = VERSION,
    about = "Shows, live, where a Linux host's TCP TIME_WAIT sockets come from",
    after_help = EXIT_CODES
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Stream TIME_WAIT births and deaths (and, with --all-states, every TCP transition)
    Watch(WatchArgs),
    /// Collect for a while, then print who makes the TIME_WAIT (table or JSON)
    Report(ReportArgs),
    /// Full-screen live view of who makes the TIME_WAIT
    Top(TopArgs),
    /// Run as a daemon: Prometheus metrics, a JSON API and a health check over HTTP
    Serve(ServeArgs),
    /// Run a command and count the TIME_WAIT its process tree causes; fail it over a budget
    Exec(ExecArgs),
    /// Watch for a while, then say what is wrong and what to change (exit 9 on a problem)
    Doctor(DoctorArgs),
}

#[derive(Args, Debug)]
pub struct DoctorArgs {
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub netns: NetnsArgs,
    /// How long to watch the traffic
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
    /// Exit 9 when a finding is at least this severe: warning (warning or critical), critical,
    /// or never
    #[arg(long, value_name = "SEVERITY", default_value = "warning", value_parser = parse_fail_on)]
    pub fail_on: FailOn,
}

/// `doctor --fail-on`: the least severe finding that makes doctor exit 9.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOn {
    Warning,
    Critical,
    Never,
}

pub fn parse_fail_on(s: &str) -> Result<FailOn, String> {
    match s {
        "warning" => Ok(FailOn::Warning),
        "critical" => Ok(FailOn::Critical),
        "never" => Ok(FailOn::Never),
        _ => Err(format!(
            "'{s}' is not a severity to fail on (warning, critical or never)"
        )),
    }
}

#[derive(Args, Debug)]
pub struct ExecArgs {
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub netns: NetnsArgs,
    /// Fail (exit 124) when the command causes more than N TIME_WAIT sockets
    #[arg(long, value_name = "N", value_parser = parse_count)]
    pub max_timewait: Option<u64>,
    /// Fail (exit 124) when the command causes more than R TIME_WAIT births in one second
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    pub max_rate: Option<f64>,
    /// Print the summary as one JSON line
    #[arg(long)]
    pub json: bool,
    /// Write the summary to FILE instead of standard error (apart from the command's output)
    #[arg(long, value_name = "FILE")]
    pub summary: Option<std::path::PathBuf>,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub group: GroupArgs,
    /// Address to listen on (loopback unless told otherwise; :PORT is every address)
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:9979", value_parser = parse_listen)]
    pub listen: std::net::SocketAddr,
    /// What to log on stderr: error, warn (also each failed request: one line per failed
    /// scrape or refused query), info (also start and stop) or debug (also every request)
    #[arg(long, value_name = "LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: LogLevel,
    /// Unprivileged user to run as once the probes are attached
    #[arg(long, value_name = "USER", default_value = "nobody")]
    pub user: String,
    /// Keys exported per grouping as metric series (the rest is summed into key="other")
    #[arg(long, value_name = "N", default_value = "50", value_parser = parse_positive)]
    pub max_series: usize,
}

/// `serve --log-level`: what serve writes to stderr, least first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
        }
    }
}

pub fn parse_log_level(s: &str) -> Result<LogLevel, String> {
    match s {
        "error" => Ok(LogLevel::Error),
        "warn" => Ok(LogLevel::Warn),
        "info" => Ok(LogLevel::Info),
        "debug" => Ok(LogLevel::Debug),
        _ => Err(format!(
            "'{s}' is not a log level (error, warn, info or debug)"
        )),
    }
}

#[derive(Args, Debug, Clone)]
pub struct GroupArgs {
    /// Group by: service (destination for connections out, port for connections in), peer,
    /// port, process or netns (each group belongs to one network namespace); for serve, the
    /// default of /api/v1/report
    #[arg(long, value_name = "GROUPING", default_value = "service", value_parser = parse_by)]
    pub by: By,
    /// Sort by: tw (TIME_WAIT now), rate (births/s over 10 s) or births; for serve, the default
    /// of /api/v1/report
    #[arg(long, value_name = "ORDER", default_value = "tw", value_parser = parse_sort)]
    pub sort: Sort,
    /// Groups kept per grouping before the smallest are folded into 'other' (memory bound)
    #[arg(long, value_name = "N", default_value = "2000", value_parser = parse_positive)]
    pub max_groups: usize,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub group: GroupArgs,
    /// How long to collect (default 30s; with --interval, until Ctrl-C)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Print a report every DURATION, each about that interval (births since the last one;
    /// TIME_WAIT now), like vmstat; with --json, one JSON document per line
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub interval: Option<Duration>,
    /// Show the N largest groups
    #[arg(long, value_name = "N", default_value = "20", value_parser = parse_positive)]
    pub top: usize,
    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// Write the report to FILE instead of standard output (each --interval report appended)
    #[arg(long, value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
pub struct TopArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    #[command(flatten)]
    pub group: GroupArgs,
}

#[derive(Args, Debug, Clone, Default)]
pub struct FilterArgs {
    /// Only connections with this local or remote port (repeatable)
    #[arg(long = "port", value_name = "PORT", value_parser = parse_port)]
    pub ports: Vec<u16>,
    /// Only connections whose remote address is in this network (repeatable)
    #[arg(long = "peer", value_name = "CIDR", value_parser = parse_cidr)]
    pub peers: Vec<Cidr>,
    /// Only sockets owned by this process id (repeatable)
    #[arg(long = "pid", value_name = "PID", value_parser = parse_pid)]
    pub pids: Vec<u32>,
    /// Only sockets owned by a process with this exact name (repeatable)
    #[arg(long = "comm", value_name = "NAME", value_parser = parse_comm)]
    pub comms: Vec<String>,
    /// Only IPv4 (v4-mapped IPv6 counts as IPv4)
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    #[command(flatten)]
    pub netns: NetnsArgs,
}

#[derive(Args, Debug, Clone, Default)]
pub struct NetnsArgs {
    /// Only this network namespace: an inode number (as `lsns -t net` shows), a name under
    /// /run/netns, or pid:PID for a process's (repeatable)
    #[arg(long = "netns", value_name = "NETNS", value_parser = parse_netns)]
    pub netns: Vec<u32>,
}

impl FilterArgs {
    pub fn to_filter(&self) -> Filter {
        Filter {
            ports: self.ports.clone(),
            peers: self.peers.clone(),
            pids: self.pids.clone(),
            comms: self.comms.clone(),
            family: if self.ipv4 {
                Some(4)
            } else if self.ipv6 {
                Some(6)
            } else {
                None
            },
            netns: self.netns.netns.clone(),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ProbeArgs {
    /// Ring buffer size between kernel and twtrace (a power of two, 4KiB to 256MiB; it costs
    /// up to twice its size in memory)
    #[arg(long, value_name = "BYTES", default_value = "4MiB", value_parser = parse_ring_size)]
    pub ring_size: RingSize,
    /// At the end, write what twtrace cost and saw (kernel counters, per-program run time and
    /// recursion misses, events received) to this file as JSON
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<std::path::PathBuf>,
    /// Attach programs that return at once, on the same hooks, and trace nothing: what the
    /// hooks alone cost (the benchmark's floor)
    #[arg(long, hide = true)]
    pub hooks_only: bool,
    /// Print what the kernel programs see on their rare paths (a TIME_WAIT timer with no
    /// matching close, a close without TIME_WAIT, a full map), through aya-log, on stderr
    #[arg(long)]
    pub debug_kernel: bool,
    /// When the kernel refuses a program, print the verifier's whole log
    #[arg(long, short = 'v')]
    pub verbose: bool,
    /// Load the programs as under lockdown=confidentiality: typed loads only, no
    /// bpf_probe_read_kernel (for the tests, on kernels without that lockdown)
    #[arg(long, hide = true)]
    pub typed_only: bool,
}

impl ProbeArgs {
    /// What to attach, for a view that needs no state transitions and no fork tracking.
    pub fn options(&self) -> crate::kernel::probes::ProbeOptions {
        crate::kernel::probes::ProbeOptions {
            ring_size: self.ring_size.bytes,
            ring_size_typed: self.ring_size.typed.clone(),
            hooks_only: self.hooks_only,
            debug_kernel: self.debug_kernel,
            verbose: self.verbose,
            typed_only: self.typed_only,
            ..Default::default()
        }
    }
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
    /// One JSON object per line
    #[arg(long)]
    pub json: bool,
    /// Also stream every TCP state transition, with its owner where known
    #[arg(long)]
    pub all_states: bool,
    /// Stop after this long (e.g. 30s, 5m); default: until Ctrl-C or SIGTERM
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Leave out the ends of TIME_WAIT sockets born before twtrace started
    #[arg(long)]
    pub new_only: bool,
    /// Text times in UTC (default: local time, from TZ or /etc/localtime, like date(1))
    #[arg(long)]
    pub utc: bool,
    /// Text time format: clock (HH:MM:SS.mmm, the default), iso (ISO 8601 with the date and
    /// the UTC offset) or epoch (seconds since 1970, for scripts)
    #[arg(long, value_name = "FORMAT", default_value = "clock", value_parser = parse_time_format)]
    pub time: TimeFormat,
}

/// `watch --time`: how text lines show when an event happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TimeFormat {
    #[default]
    Clock,
    Iso,
    Epoch,
}

pub fn parse_time_format(s: &str) -> Result<TimeFormat, String> {
    match s {
        "clock" => Ok(TimeFormat::Clock),
        "iso" => Ok(TimeFormat::Iso),
        "epoch" => Ok(TimeFormat::Epoch),
        _ => Err(format!("'{s}' is not a time format (clock, iso or epoch)")),
    }
}

pub fn parse_by(s: &str) -> Result<By, String> {
    s.parse()
}

pub fn parse_sort(s: &str) -> Result<Sort, String> {
    s.parse()
}

/// A count of at least 1 (and at most a million: these bound memory and screen lines).
pub fn parse_positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) && s.chars().all(|c| c.is_ascii_digit()) => Ok(n),
        _ => Err(format!("'{s}' is not a count from 1 to 1000000")),
    }
}

/// A count that may be zero (a budget of no TIME_WAIT at all).
pub fn parse_count(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if s.chars().all(|c| c.is_ascii_digit()) => Ok(n),
        _ => Err(format!("'{s}' is not a count (0 or more)")),
    }
}

/// A positive, finite rate per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && !s.starts_with('+') => Ok(r),
        _ => Err(format!("'{s}' is not a rate per second (a number above 0)")),
    }
}

/// `ADDR:PORT`, `[ADDR]:PORT`, or `:PORT` for every address (IPv6 and IPv4: `[::]:PORT`, see
/// `views::serve::bind`), as node_exporter takes it.
pub fn parse_listen(s: &str) -> Result<std::net::SocketAddr, String> {
    let bad = || {
        format!(
            "'{s}' is not an address to listen on (like 127.0.0.1:9979, [::1]:9979 or :9979 \
             for every address)"
        )
    };
    match s.strip_prefix(':') {
        Some(port) => match parse_port(port) {
            Ok(p) => Ok(std::net::SocketAddr::new(
                std::net::Ipv6Addr::UNSPECIFIED.into(),
                p,
            )),
            Err(_) => Err(bad()),
        },
        None => s.parse().map_err(|_| bad()),
    }
}

pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 && s.chars().all(|c| c.is_ascii_digit()) => Ok(p),
        _ => Err(format!("'{s}' is not a TCP port (1 to 65535)")),
    }
}

/// A network namespace that exists now (see `host::netns::resolve`).
pub fn parse_netns(s: &str) -> Result<u32, String> {
    crate::host::netns::resolve(s)
}

pub fn parse_cidr(s: &str) -> Result<Cidr, String> {
    s.parse()
}

pub fn parse_pid(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(p) if p > 0 && s.chars().all(|c| c.is_ascii_digit()) => Ok(p),
        _ => Err(format!("'{s}' is not a process id (a positive integer)")),
    }
}

pub fn parse_comm(s: &str) -> Result<String, String> {
    if s.is_empty() {
        Err("a process name cannot be empty".into())
    } else if s.len() > 15 {
        // What twtrace will show for such a process: the kernel's 15 bytes, a character cut
        // in two shown as '?' (see `decode::comm`).
        let mut raw = [0u8; 16];
        raw[..15].copy_from_slice(&s.as_bytes()[..15]);
        Err(format!(
            "'{s}' is longer than 15 bytes; the kernel keeps only the first 15 of a process \
             name: use '{}'",
            crate::kernel::decode::comm(&raw)
        ))
    } else {
        Ok(s.to_owned())
    }
}

/// `500ms`, `30s`, `5m`, `1h`, or plain seconds. Zero is refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("'{s}' is not a duration (like 500ms, 30s, 5m, 1h)");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    if num.is_empty() || num.len() > 9 {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(bad()),
    };
    if d.is_zero() {
        return Err(format!("'{s}': the duration must be more than zero"));
    }
    Ok(d)
}

/// A ring buffer size, and how the user wrote it (messages repeat it as typed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingSize {
    pub bytes: u32,
    pub typed: String,
}

/// The largest ring buffer: 256 MiB (the reader maps it twice, so up to 512 MB of memory; the
/// default 4 MiB holds about 65,000 events).
pub const MAX_RING_SIZE: u64 = 256 << 20;

/// `4096`, `64KiB`, `4MiB`, `256MiB` (also `K`, `M`, `G`): a power of two, 4 KiB to 256 MiB.
pub fn parse_ring_size(s: &str) -> Result<RingSize, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || format!("'{s}' is not a size (like 65536, 256KiB, 4MiB)");
    let n: u64 = if num.is_empty() || num.len() > 10 {
        return Err(bad());
    } else {
        num.parse().map_err(|_| bad())?
    };
    let mult: u64 = match unit {
        "" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    let bytes = n.checked_mul(mult).ok_or_else(bad)?;
    if !bytes.is_power_of_two() || !(4096..=MAX_RING_SIZE).contains(&bytes) {
        return Err(format!(
            "'{s}': the ring buffer size must be a power of two from 4KiB to 256MiB"
        ));
    }
    Ok(RingSize {
        bytes: bytes as u32,
        typed: s.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_port("80"), Ok(80));
        assert_eq!(parse_port("65535"), Ok(65535));
        for bad in ["0", "65536", "-1", "+80", "http", "", " 80", "8o"] {
            let e = parse_port(bad).unwrap_err();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "0s", "-1s", "1.5s", "10x", "1000000000000s", "1 s"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(e.contains(&format!("'{bad}'")), "{e}");
        }
    }

    #[test]
    fn ring_sizes() {
        let bytes = |s| parse_ring_size(s).map(|r| r.bytes);
        assert_eq!(bytes("4MiB"), Ok(4 << 20));
        assert_eq!(bytes("4096"), Ok(4096));
        assert_eq!(bytes("64K"), Ok(64 << 10));
        assert_eq!(bytes("256MiB"), Ok(256 << 20));
        assert_eq!(parse_ring_size("64K").unwrap().typed, "64K");
        for bad in [
            "3MiB",
            "1024",
            "2GiB",
            "1GiB",
            "512M",
            "abc",
            "",
            "4Mb",
            "99999999999999999999",
        ] {
            assert!(parse_ring_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn comms_and_pids() {
        assert_eq!(parse_comm("nginx"), Ok("nginx".into()));
        assert!(
            parse_comm("a-very-long-process-name")
                .unwrap_err()
                .contains("'a-very-long-pr")
        );
        assert!(parse_comm("").is_err());
        // Cut inside a character: the suggestion is what twtrace shows for such a process.
        let e = parse_comm("aaaaaaaaaaaaaaé-long").unwrap_err();
        assert!(e.ends_with("use 'aaaaaaaaaaaaaa?'"), "{e}");
        let e = parse_comm("ééééééééé").unwrap_err();
        assert!(e.ends_with("use 'ééééééé?'"), "{e}");
        assert_eq!(parse_comm("ééééééé?"), Ok("ééééééé?".into()));
        assert_eq!(parse_pid("1"), Ok(1));
        assert!(parse_pid("0").unwrap_err().contains("'0'"));
        assert!(parse_pid("x").is_err());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen(":9979"), Ok("[::]:9979".parse().unwrap()));
        assert_eq!(
            parse_listen("127.0.0.1:9979"),
            Ok("127.0.0.1:9979".parse().unwrap())
        );
        for bad in [":", ":0", ":99999", "9979", "127.0.0.1"] {
            assert!(parse_listen(bad).unwrap_err().contains(&format!("'{bad}'")));
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn ipv4_and_ipv6_conflict() {
        assert!(Cli::try_parse_from(["twtrace", "watch", "-4", "-6"]).is_err());
        let cli =
            Cli::try_parse_from(["twtrace", "watch", "--port", "80", "--peer", "::1"]).unwrap();
        let Command::Watch(w) = cli.command else {
            panic!("watch")
        };
        assert_eq!(w.filter.to_filter().ports, vec![80]);
        for bad in [
            vec!["twtrace", "report", "--by", "host"],
            vec!["twtrace", "report", "--top", "0"],
            vec!["twtrace", "report", "--sort", "size"],
            vec!["twtrace", "report", "--duration", "0s"],
            vec!["twtrace", "top", "--max-groups", "-1"],
        ] {
            let e = Cli::try_parse_from(&bad).unwrap_err().to_string();
            assert!(e.contains(&format!("'{}'", bad[3])), "{e}");
        }
        let cli = Cli::try_parse_from(["twtrace", "report", "--by", "peer", "--json"]).unwrap();
        let Command::Report(r) = cli.command else {
            panic!("report")
        };
        assert_eq!((r.group.by, r.top, r.json), (By::Peer, 20, true));
    }
}
