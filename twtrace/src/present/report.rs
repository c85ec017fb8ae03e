//! The aggregate as rows, a table and the JSON document that `report --json`,
//! `GET /api/v1/report` and `top` share. Pure: built from an `Aggregator` and a `Context`.

use std::str::FromStr;

use serde_json::{Value, json};

use crate::{
    host::{cgroup::Unit, close_wait::CloseWait},
    output::printable,
    track::aggregate::{Aggregator, By, Group, Key, REASONS, merge},
    track::lifecycle::FailReason,
    track::session::Loss,
};

/// What the aggregate does not know: the run, the namespaces and the kernel's own figures.
#[derive(Clone, Debug, Default)]
pub struct Context {
    pub duration_s: f64,
    /// Monotonic second "now", for the rate windows.
    pub now_sec: u64,
    pub loss: Loss,
    /// The network namespaces in play (those twtrace saw TIME_WAIT in and its own, or those
    /// `--netns` named), with the kernel's figures in each, by inode.
    pub namespaces: Vec<NsContext>,
    /// Namespaces that could not be read (no privilege to enter them).
    pub unreadable: usize,
    /// CLOSE_WAIT sockets per process now (sock_diag), largest first.
    pub close_wait: Vec<CloseWait>,
}

/// One namespace in play: its name and what its kernel says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NsContext {
    pub netns: u32,
    pub name: String,
    /// /proc/net/sockstat `tw` there: the kernel's count of TIME_WAIT sockets now (None when
    /// the namespace could not be read).
    pub kernel_time_wait: Option<u64>,
    /// TIME_WAIT not created there since start because tcp_max_tw_buckets was full (TcpExt).
    pub skipped_overflow: u64,
    /// Usable ports of its ip_local_port_range (minus reserved ports).
    pub ephemeral_ports: Option<u32>,
    pub max_tw_buckets: Option<u64>,
}

impl Context {
    /// The kernel's TIME_WAIT count over the namespaces in play: the same set twtrace's own
    /// figure counts (None when none could be read).
    pub fn kernel_time_wait(&self) -> Option<u64> {
        self.namespaces
            .iter()
            .filter_map(|n| n.kernel_time_wait)
            .reduce(|a, b| a + b)
    }

    pub fn skipped_overflow(&self) -> u64 {
        self.namespaces.iter().map(|n| n.skipped_overflow).sum()
    }

    /// The usable ephemeral ports when every namespace in play has the same number.
    pub fn ephemeral_ports(&self) -> Option<u32> {
        let mut it = self.namespaces.iter().map(|n| n.ephemeral_ports);
        let first = it.next()??;
        it.all(|p| p == Some(first)).then_some(first)
    }

    /// The name to show for a namespace.
    pub fn netns_name(&self, netns: u32) -> String {
        self.namespaces
            .iter()
            .find(|n| n.netns == netns)
            .map_or_else(|| netns.to_string(), |n| n.name.clone())
    }

    /// More than one namespace is in play: the views show which one each row is about.
    pub fn several_namespaces(&self) -> bool {
        self.namespaces.len() > 1
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Sort {
    /// TIME_WAIT sockets now.
    #[default]
    TimeWait,
    /// Birth rate over the last 10 s.
    Rate,
    /// Births since start.
    Entered,
}

impl Sort {
    pub const ALL: [Sort; 3] = [Sort::TimeWait, Sort::Rate, Sort::Entered];

    pub fn as_str(self) -> &'static str {
        match self {
            Sort::TimeWait => "tw",
            Sort::Rate => "rate",
            Sort::Entered => "births",
        }
    }
}

impl FromStr for Sort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tw" => Ok(Sort::TimeWait),
            "rate" => Ok(Sort::Rate),
            "births" => Ok(Sort::Entered),
            _ => Err(format!("'{s}' is not a sort order (tw, rate or births)")),
        }
    }
}

/// One group, ready to show.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub key: String,
    /// Its namespace (inode), and its name.
    pub netns: u32,
    pub netns_name: String,
    pub entered: u64,
    pub exited: u64,
    pub in_time_wait: u64,
    pub in_fin_wait2: u64,
    /// Indexed like `FailReason::ALL`.
    pub connect_failures: [u64; 6],
    /// Births per second over the last 1, 10 and 60 complete seconds; None until the run has
    /// lasted that long (a window that started before the run would count too little).
    pub rate_1s: Option<f64>,
    pub rate_10s: Option<f64>,
    pub rate_60s: Option<f64>,
    /// Births per second over the whole run.
    pub rate_avg: f64,
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
    pub max_ms: Option<u64>,
    /// Indexed like `aggregate::REASONS`.
    pub exits: [u64; 4],
    pub processes: Vec<(u32, String)>,
    pub cgroup_id: Option<u64>,
}

/// Births per second over the `window` complete seconds before now, when they all lie
/// within the run: the run must have lasted one second more (its first second is partial).
fn windowed(g: &Group, ctx: &Context, window: u64) -> Option<f64> {
    (ctx.duration_s >= (window + 1) as f64).then(|| g.rate(ctx.now_sec, window))
}

/// Births per second over the run so far.
fn average(g: &Group, ctx: &Context) -> f64 {
    if ctx.duration_s > 0.0 {
        g.entered as f64 / ctx.duration_s
    } else {
        0.0
    }
}

fn row(key: String, netns: u32, g: &Group, ctx: &Context) -> Row {
    Row {
        key,
        netns,
        netns_name: ctx.netns_name(netns),
        entered: g.entered,
        exited: g.exited,
        in_time_wait: g.in_time_wait,
        in_fin_wait2: g.in_fin_wait2,
        connect_failures: g.connect_failures,
        rate_1s: windowed(g, ctx, 1),
        rate_10s: windowed(g, ctx, 10),
        rate_60s: windowed(g, ctx, 60),
        rate_avg: average(g, ctx),
        p50_ms: g.lifetimes.quantile_ms(0.5),
        p99_ms: g.lifetimes.quantile_ms(0.99),
        max_ms: g.lifetimes.max_ms(),
        exits: g.exits,
        processes: g
            .owners
            .iter()
            .rev()
            .map(|(pid, comm)| (*pid, comm.to_string()))
            .collect(),
        cgroup_id: g.cgroup_id,
    }
}

/// Groups sorted (largest first), the top `top` of them, and `other`: the groups past `top` and
/// those folded to bound memory, summed (None when there are none). `matches` keeps the rows
/// whose key passes (the views' key filter).
pub fn rows(
    agg: &Aggregator,
    by: By,
    sort: Sort,
    top: usize,
    ctx: &Context,
    matches: &dyn Fn(&Key) -> bool,
) -> (Vec<Row>, Option<Row>) {
    let (groups, folded) = agg.groups(by);
    let mut ranked: Vec<(f64, String, &Key, &Group)> = groups
        .into_iter()
        .filter(|(k, _)| matches(k))
        .map(|(k, g)| {
            let primary = match sort {
                Sort::TimeWait => g.in_time_wait as f64,
                // Before 10 s have passed: the rate over the run so far.
                Sort::Rate => windowed(g, ctx, 10).unwrap_or_else(|| average(g, ctx)),
                Sort::Entered => g.entered as f64,
            };
            (primary, k.to_string(), k, g)
        })
        .collect();
    ranked.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(b.3.in_time_wait.cmp(&a.3.in_time_wait))
            .then(b.3.entered.cmp(&a.3.entered))
            .then(a.1.cmp(&b.1))
    });
    let rest = ranked.split_off(top.min(ranked.len()));
    let rows = ranked
        .into_iter()
        .map(|(_, name, k, g)| row(name, k.netns, g, ctx))
        .collect();
    let other = (!rest.is_empty() || folded.is_some()).then(|| {
        let sum = merge(rest.iter().map(|(_, _, _, g)| *g).chain(folded));
        row("other".into(), 0, &sum, ctx)
    });
    (rows, other)
}

fn exits_json(exits: &[u64; 4]) -> Value {
    let mut m = serde_json::Map::new();
    for (i, r) in REASONS.iter().enumerate() {
        m.insert(r.as_str().into(), json!(exits[i]));
    }
    Value::Object(m)
}

fn row_json(by: By, r: &Row, unit: Option<Unit>) -> Value {
    let pod = unit.as_ref().and_then(|u| {
        let w = &u.workload;
        w.pod_uid
            .as_ref()
            .map(|uid| json!({"uid": uid, "qos": w.qos, "container": w.container}))
    });
    json!({
        "by": by.as_str(),
        "key": r.key,
        "netns": (r.netns != 0).then(|| json!({"inode": r.netns, "name": r.netns_name})),
        "entered": r.entered,
        "exited": r.exited,
        "in_time_wait": r.in_time_wait,
        "in_fin_wait2": r.in_fin_wait2,
        "connect_failures": failures_json(&r.connect_failures),
        "rate_per_s": round2(r.rate_avg),
        "rates": {"1s": r.rate_1s.map(round2), "10s": r.rate_10s.map(round2), "60s": r.rate_60s.map(round2)},
        "lifetime_ms": {"p50": r.p50_ms, "p99": r.p99_ms, "max": r.max_ms},
        "exits": exits_json(&r.exits),
        "processes": r.processes.iter().map(|(pid, comm)| json!({"pid": pid, "comm": comm})).collect::<Vec<_>>(),
        "unit": unit.map(|u| u.label),
        "pod": pod,
    })
}

fn failures_json(f: &[u64; 6]) -> Value {
    let mut m = serde_json::Map::new();
    for (i, r) in FailReason::ALL.iter().enumerate() {
        m.insert(r.as_str().into(), json!(f[i]));
    }
    Value::Object(m)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The report document (see README "twtrace report").
pub fn json(
    agg: &Aggregator,
    by: By,
    sort: Sort,
    top: usize,
    ctx: &Context,
    unit_of: &mut dyn FnMut(u64) -> Option<Unit>,
) -> Value {
    let (rows, other) = rows(agg, by, sort, top, ctx, &|_| true);
    let t = agg.totals();
    let mut unit = |r: &Row| {
        if by == By::Process {
            r.cgroup_id.and_then(&mut *unit_of)
        } else {
            None
        }
    };
    let groups: Vec<Value> = rows.iter().map(|r| row_json(by, r, unit(r))).collect();
    let namespaces: Vec<Value> = ctx
        .namespaces
        .iter()
        .map(|n| {
            let (tw, fw2) = agg.in_netns(n.netns);
            json!({
                "netns": n.netns,
                "name": n.name,
                "in_time_wait": tw,
                "in_fin_wait2": fw2,
                "kernel_time_wait": n.kernel_time_wait,
                "skipped_overflow": n.skipped_overflow,
                "ephemeral_ports": n.ephemeral_ports,
                "max_tw_buckets": n.max_tw_buckets,
            })
        })
        .collect();
    json!({
        "duration_s": round2(ctx.duration_s),
        "by": by.as_str(),
        "complete": ctx.loss.total() == 0,
        "totals": {
            "entered": t.entered,
            "exited": t.exited,
            "in_time_wait": t.in_time_wait,
            "in_fin_wait2": t.in_fin_wait2,
            "seeded": t.seeded,
            "connect_failures": failures_json(&t.connect_failures),
            "lost_events": ctx.loss.total(),
            "skipped_overflow": ctx.skipped_overflow(),
            "kernel_time_wait": ctx.kernel_time_wait(),
            "ephemeral_ports": ctx.ephemeral_ports(),
        },
        "namespaces": namespaces,
        "namespaces_unreadable": ctx.unreadable,
        "exits": exits_json(&t.exits),
        "lost": {
            "ring_full": ctx.loss.ring_full,
            "recursion": ctx.loss.recursion_misses,
            "malformed": ctx.loss.malformed,
            "unjoined": ctx.loss.unjoined,
        },
        "groups": groups,
        "groups_total": agg.groups(by).0.len(),
        "groups_folded": agg.folded_groups(by),
        "other": other.map(|r| row_json(by, &r, None)),
        "close_wait": ctx.close_wait.iter().map(|c| json!({
            "pid": c.pid,
            "comm": c.comm,
            "sockets": c.sockets,
            "netns": {"inode": c.netns, "name": ctx.netns_name(c.netns)},
            "listener_port": c.listener_port,
        })).collect::<Vec<_>>(),
    })
}

pub fn fmt_ms(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 1000 => format!("{ms}ms"),
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
    }
}

fn owners(r: &Row) -> String {
    let mut s = r
        .processes
        .iter()
        .map(|(pid, comm)| format!("{}[{pid}]", printable(comm)))
        .collect::<Vec<_>>()
        .join(" ");
    if s.is_empty() {
        s = "-".into();
    }
    s
}

/// The report as text for a terminal: host totals, then one line per group (80 columns). The
/// last column names the owners, or for `--by process` the unit or container.
pub fn table(
    agg: &Aggregator,
    by: By,
    sort: Sort,
    top: usize,
    ctx: &Context,
    unit_of: &mut dyn FnMut(u64) -> Option<Unit>,
) -> String {
    let (rows, other) = rows(agg, by, sort, top, ctx, &|_| true);
    let t = agg.totals();
    let mut out = String::new();
    let num = |n: Option<u64>| n.map_or("-".to_owned(), |n| n.to_string());
    fit(
        &mut out,
        &[
            format!(
                "{:.0}s: {} TIME_WAIT births, {} ends",
                ctx.duration_s, t.entered, t.exited
            ),
            format!(
                "({} expired, {} reused, {} syn, {} killed)",
                t.exits[0], t.exits[1], t.exits[2], t.exits[3]
            ),
        ],
    );
    // sockstat's `tw` counts both substates: the kernel figure is beside their sum.
    let now = if t.in_fin_wait2 > 0 {
        format!(
            "now: {} in TIME_WAIT + {} in FIN_WAIT2 ({} from before start),",
            t.in_time_wait, t.in_fin_wait2, t.seeded
        )
    } else {
        format!(
            "now: {} in TIME_WAIT ({} from before start),",
            t.in_time_wait, t.seeded
        )
    };
    let kernel = format!("kernel says {}", num(ctx.kernel_time_wait()));
    if ctx.several_namespaces() {
        fit(
            &mut out,
            &[now, format!("{kernel} in {} netns:", ctx.namespaces.len())],
        );
        for n in &ctx.namespaces {
            let (tw, fw2) = agg.in_netns(n.netns);
            let twtrace = tw + fw2;
            out.push_str(&format!(
                "  {:<16} {:>7} timewait, kernel {:>7}; ephemeral ports {}\n",
                clip(&printable(&n.name), 16),
                twtrace,
                num(n.kernel_time_wait),
                num(n.ephemeral_ports.map(u64::from))
            ));
        }
    } else {
        let ports = format!(
            "ephemeral ports {}",
            num(ctx.ephemeral_ports().map(u64::from))
        );
        fit(&mut out, &[now, format!("{kernel};"), ports]);
    }
    if ctx.unreadable > 0 {
        out.push_str(&format!(
            "({} network namespaces could not be read: no privilege to enter or find them)\n",
            ctx.unreadable
        ));
    }
    if ctx.loss.total() > 0 || ctx.skipped_overflow() > 0 {
        out.push_str(&format!(
            "INCOMPLETE: {} events lost, {} TIME_WAIT skipped (tcp_max_tw_buckets full)\n",
            ctx.loss.total(),
            ctx.skipped_overflow()
        ));
    }
    let failed: u64 = t.connect_failures.iter().sum();
    if failed > 0 {
        let why: Vec<String> = FailReason::ALL
            .iter()
            .zip(t.connect_failures)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| format!("{n} {}", r.as_str()))
            .collect();
        out.push_str(&format!("failed connects: {failed} ({})\n", why.join(", ")));
    }
    out.push('\n');
    // A namespace column only where rows come from more than one, a FAILED column (connect()
    // failures) only where a row has some; the other columns narrow so that a line still fits
    // 80 columns (with both, FAILED takes P50's place).
    let netns_col = rows.iter().any(|r| r.netns != rows[0].netns);
    let failed_col = rows
        .iter()
        .any(|r| r.connect_failures.iter().any(|&n| n > 0));
    let (kw, nw) = match (netns_col, failed_col) {
        (false, false) => (24, 7),
        (true, _) => (21, 6),
        (false, true) => (24, 6),
    };
    let ns = |name: &str| {
        if netns_col {
            format!("{:<10} ", clip(name, 10))
        } else {
            String::new()
        }
    };
    let last_cols = |failed: String, p50: String| match (netns_col, failed_col) {
        (_, false) => format!("{p50:>nw$}"),
        (true, true) => format!("{failed:>nw$}"),
        (false, true) => format!("{failed:>nw$} {p50:>nw$}"),
    };
    out.push_str(&format!(
        "{:<kw$} {}{:>nw$} {:>nw$} {:>nw$} {:>nw$} {} {}\n",
        by.as_str().to_uppercase(),
        ns("NETNS"),
        if netns_col || failed_col {
            "TW"
        } else {
            "TW NOW"
        },
        "BIRTHS",
        "PER S",
        "ENDS",
        last_cols("FAILED".into(), "P50".into()),
        if by == By::Process {
            "UNIT"
        } else {
            "PROCESSES"
        }
    ));
    for r in rows.iter().chain(other.iter()) {
        // Keys, names and units are the world's (a process may name itself with escape
        // sequences or a newline): escaped for the terminal.
        let key = if by == By::Netns && r.netns != 0 {
            clip(&printable(&r.netns_name), kw)
        } else {
            printable(&r.key).into_owned()
        };
        let line = format!(
            "{:<kw$} {}{:>nw$} {:>nw$} {:>nw$.1} {:>nw$} {} {}",
            key,
            ns(&if r.netns == 0 {
                String::new()
            } else {
                printable(&r.netns_name).into_owned()
            }),
            r.in_time_wait,
            r.entered,
            r.rate_avg,
            r.exited,
            last_cols(
                r.connect_failures.iter().sum::<u64>().to_string(),
                fmt_ms(r.p50_ms)
            ),
            if by == By::Process {
                r.cgroup_id
                    .and_then(&mut *unit_of)
                    .map_or_else(|| "-".into(), |u| printable(&u.label).into_owned())
            } else {
                owners(r)
            }
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    let folded = agg.folded_groups(by);
    if folded > 0 {
        out.push_str(&format!(
            "({folded} smaller groups folded into 'other' to bound memory)\n"
        ));
    }
    if !ctx.close_wait.is_empty() {
        out.push_str("\nCLOSE_WAIT now (the process never called close()):\n");
        for c in &ctx.close_wait {
            let place = if ctx.several_namespaces() {
                format!(" (netns {})", printable(&ctx.netns_name(c.netns)))
            } else {
                String::new()
            };
            let comm = printable(&c.comm);
            match c.listener_port {
                Some(port) => out.push_str(&format!(
                    "  {comm}[{}]: {} not accepted on port {port}{place}\n",
                    c.pid, c.sockets
                )),
                None => out.push_str(&format!("  {comm}[{}]: {}{place}\n", c.pid, c.sockets)),
            }
        }
    }
    out
}

/// Pieces joined by spaces into lines of at most 80 columns (a piece is never cut), each line
/// ended: the report promises 80x24.
fn fit(out: &mut String, pieces: &[String]) {
    let mut line = String::new();
    for p in pieces {
        if !line.is_empty() && line.len() + 1 + p.len() > 80 {
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(p);
    }
    out.push_str(&line);
    out.push('\n');
}

/// At most `width` characters (a longer text keeps its end, which tells names apart).
pub fn clip(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        s.to_owned()
    } else {
        let tail: String = s.chars().skip(n - width + 1).collect();
        format!("~{tail}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        host::close_wait::CloseWait,
        kernel::decode::{Conn, Process, Role},
        track::lifecycle::{Event, Reason, TwEnter, TwExit},
    };

    fn agg() -> Aggregator {
        let mut a = Aggregator::new(100);
        let s = 1_000_000_000u64;
        let mut timer = 0;
        for (peer, n) in [
            ("10.0.0.2:6379", 5u64),
            ("10.0.0.3:5432", 2),
            ("[fd00::1]:80", 1),
        ] {
            for _ in 0..n {
                timer += 1;
                let conn = Conn {
                    local: format!("10.0.0.1:{}", 40000 + timer).parse().unwrap(),
                    remote: peer.parse().unwrap(),
                };
                a.on_event(&Event::Enter(TwEnter {
                    netns: 0,
                    ts_ns: 10 * s,
                    timer,
                    conn,
                    owner: Some(Process {
                        pid: 42,
                        tid: 42,
                        comm: "api".into(),
                        cgroup_id: 9,
                    }),
                    role: Role::Connected,
                    timeout_jiffies: 0,
                    substate: crate::track::lifecycle::Substate::TimeWait,
                    bound: false,
                    seeded: false,
                }));
                if timer == 1 {
                    a.on_event(&Event::Exit(TwExit {
                        netns: 0,
                        ts_ns: 70 * s,
                        timer,
                        conn: Some(conn),
                        owner: None,
                        role: Role::Connected,
                        reason: Reason::Expired,
                        lifetime_ns: Some(60_500 * 1_000_000),
                        substate: crate::track::lifecycle::Substate::TimeWait,
                        seeded: false,
                    }));
                }
            }
        }
        a
    }

    fn ctx() -> Context {
        Context {
            duration_s: 10.0,
            now_sec: 11,
            ..Context::default()
        }
    }

    #[test]
    fn json_has_the_documented_keys() {
        let a = agg();
        let v = json(&a, By::Peer, Sort::TimeWait, 10, &ctx(), &mut |_| None);
        assert_eq!(v["duration_s"], 10.0);
        assert_eq!(v["totals"]["entered"], 8);
        assert_eq!(v["totals"]["exited"], 1);
        assert_eq!(v["totals"]["in_time_wait"], 7);
        assert_eq!(v["totals"]["lost_events"], 0);
        assert_eq!(v["totals"]["skipped_overflow"], 0);
        assert_eq!(v["exits"]["expired"], 1);
        for k in ["reused", "syn", "killed"] {
            assert_eq!(v["exits"][k], 0);
        }
        let g = &v["groups"][0];
        assert_eq!(g["by"], "peer");
        assert_eq!(g["key"], "10.0.0.2:6379");
        assert_eq!(g["entered"], 5);
        assert_eq!(g["exited"], 1);
        assert_eq!(g["in_time_wait"], 4);
        assert_eq!(g["rate_per_s"], 0.5);
        assert!(g["lifetime_ms"]["p50"].as_u64().unwrap().abs_diff(60_500) < 1000);
        assert_eq!(g["lifetime_ms"]["max"], 60_500);
        assert_eq!(g["exits"]["expired"], 1);
        assert_eq!(g["processes"][0]["pid"], 42);
        assert_eq!(g["processes"][0]["comm"], "api");
        assert_eq!(v["groups"][2]["key"], "[fd00::1]:80");
        assert!(v["other"].is_null());
        assert_eq!(v["complete"], true);
    }

    #[test]
    fn sorting_and_top() {
        let a = agg();
        let (top2, _) = rows(&a, By::Peer, Sort::Entered, 2, &ctx(), &|_| true);
        assert_eq!(
            top2.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(),
            vec!["10.0.0.2:6379", "10.0.0.3:5432"]
        );
        let (one, _) = rows(&a, By::Peer, Sort::TimeWait, 10, &ctx(), &|k| {
            k.to_string().contains("5432")
        });
        assert_eq!(one.len(), 1);
        assert_eq!("rate".parse::<Sort>(), Ok(Sort::Rate));
        assert!("size".parse::<Sort>().unwrap_err().contains("'size'"));
    }

    /// With several namespaces, the table says what each one's kernel counts and which
    /// namespace each row is in, still in 80 columns.
    #[test]
    fn table_names_namespaces_when_several() {
        let mut a = Aggregator::new(100);
        for (timer, netns) in [(1u64, 4026532281u32), (2, 4026532281), (3, 4026532999)] {
            a.on_event(&Event::Enter(TwEnter {
                ts_ns: 10_000_000_000,
                timer,
                conn: Conn {
                    local: format!("127.0.0.1:{}", 40000 + timer).parse().unwrap(),
                    remote: "127.0.0.1:6379".parse().unwrap(),
                },
                netns,
                owner: None,
                role: Role::Connected,
                timeout_jiffies: 0,
                substate: crate::track::lifecycle::Substate::TimeWait,
                bound: false,
                seeded: false,
            }));
        }
        let ns = |netns, name: &str, tw| NsContext {
            netns,
            name: name.into(),
            kernel_time_wait: Some(tw),
            skipped_overflow: 0,
            ephemeral_ports: Some(1000),
            max_tw_buckets: None,
        };
        let c = Context {
            namespaces: vec![
                ns(4026532281, "web-7c9f4d-x2x", 2),
                ns(4026532999, "pod 7c0a1e3b-5d2f-4a6b-9c8d-0e1f2a3b4c5d", 1),
            ],
            ..ctx()
        };
        let t = table(&a, By::Peer, Sort::TimeWait, 10, &c, &mut |_| None);
        assert!(t.contains("kernel says 3 in 2 netns:"), "{t}");
        assert!(
            t.contains("  web-7c9f4d-x2x         2 timewait, kernel       2; ephemeral ports 1000"),
            "{t}"
        );
        // Names too long keep their end (a pod UID's tells pods apart).
        assert!(t.contains("  ~8d-0e1f2a3b4c5d       1 timewait"), "{t}");
        assert!(
            t.contains("PEER                  NETNS          TW BIRTHS"),
            "{t}"
        );
        assert!(
            t.contains("127.0.0.1:6379        ~c9f4d-x2x      2      2"),
            "{t}"
        );
        assert!(
            t.contains("127.0.0.1:6379        ~f2a3b4c5d      1      1"),
            "{t}"
        );
        for line in t.lines() {
            assert!(line.len() <= 80, "{line}");
        }
        let v = json(&a, By::Netns, Sort::TimeWait, 10, &c, &mut |_| None);
        assert_eq!(v["groups"][0]["key"], "4026532281");
        assert_eq!(v["groups"][0]["netns"]["name"], "web-7c9f4d-x2x");
        assert_eq!(v["namespaces"][1]["in_time_wait"], 1);
        assert_eq!(v["totals"]["kernel_time_wait"], 3);
        assert_eq!(v["totals"]["ephemeral_ports"], 1000);
    }

    /// Rate windows longer than the run are null, not a rate over a window that was partly
    /// before it started (rates.60s used to divide a 6 s run's births by 59).
    #[test]
    fn rate_windows_longer_than_the_run_are_null() {
        let a = agg();
        let six = Context {
            duration_s: 6.0,
            now_sec: 11,
            ..Context::default()
        };
        let v = json(&a, By::Peer, Sort::TimeWait, 10, &six, &mut |_| None);
        let rates = &v["groups"][0]["rates"];
        assert_eq!(rates["1s"], 5.0, "{rates}");
        assert!(rates["10s"].is_null() && rates["60s"].is_null(), "{rates}");
        let long = Context {
            duration_s: 61.0,
            now_sec: 70,
            ..Context::default()
        };
        let v = json(&a, By::Peer, Sort::TimeWait, 10, &long, &mut |_| None);
        let rates = &v["groups"][0]["rates"];
        // 5 births at second 10: over the 60 complete seconds 10..69.
        assert_eq!(rates["60s"], round2(5.0 / 60.0), "{rates}");
        assert_eq!(rates["10s"], 0.0, "{rates}");
    }

    /// Every line of the table fits 80 columns, whatever the figures.
    #[test]
    fn header_lines_fit_80_columns_with_large_figures() {
        let a = agg();
        let mut c = Context {
            duration_s: 86_400.0,
            now_sec: 11,
            ..Context::default()
        };
        c.namespaces = vec![NsContext {
            netns: 1,
            name: "host".into(),
            kernel_time_wait: Some(12_345_678),
            ephemeral_ports: Some(28232),
            max_tw_buckets: None,
            skipped_overflow: 0,
        }];
        c.loss.ring_full = 0;
        let t = table(&a, By::Peer, Sort::TimeWait, 10, &c, &mut |_| None);
        for line in t.lines() {
            assert!(line.len() <= 80, "{} columns: {line}", line.len());
        }
        assert!(t.contains("kernel says 12345678;"), "{t}");
        // A busy host with several namespaces: 100,000 TIME_WAIT from before start and 20,000
        // born since, in three namespaces (this line was 83 columns).
        let mut big = Aggregator::new(100);
        for i in 0..120_000u64 {
            let netns = 1 + (i % 3) as u32;
            big.on_event(&Event::Enter(TwEnter {
                netns,
                ts_ns: 10_000_000_000,
                timer: i + 1,
                conn: Conn {
                    local: format!("10.{}.{}.1:{}", i / 60_000, netns, 1024 + i % 60_000)
                        .parse()
                        .unwrap(),
                    remote: "10.9.0.2:6379".parse().unwrap(),
                },
                owner: None,
                role: Role::Connected,
                timeout_jiffies: 0,
                substate: crate::track::lifecycle::Substate::TimeWait,
                bound: false,
                seeded: i < 100_000,
            }));
        }
        c.namespaces = (1..=3)
            .map(|netns| NsContext {
                netns,
                name: format!("ns{netns}"),
                kernel_time_wait: Some(40_000 + netns as u64 % 2),
                ..c.namespaces[0].clone()
            })
            .collect();
        let t = table(&big, By::Peer, Sort::TimeWait, 10, &c, &mut |_| None);
        for line in t.lines() {
            assert!(line.len() <= 80, "{} columns: {line}", line.len());
        }
        assert!(
            t.contains("now: 120000 in TIME_WAIT (100000 from before start),\nkernel says 120002 in 3 netns:"),
            "{t}"
        );
    }

    /// A process named with an escape sequence and a newline: one line, escaped.
    #[test]
    fn table_escapes_control_characters() {
        let mut a = Aggregator::new(100);
        a.on_event(&Event::Enter(TwEnter {
            netns: 0,
            ts_ns: 10_000_000_000,
            timer: 1,
            conn: Conn {
                local: "10.0.0.1:40000".parse().unwrap(),
                remote: "10.0.0.2:80".parse().unwrap(),
            },
            owner: Some(Process {
                pid: 7,
                tid: 7,
                comm: "\x1b[31mred\nx".into(),
                cgroup_id: 0,
            }),
            role: Role::Connected,
            timeout_jiffies: 0,
            substate: crate::track::lifecycle::Substate::TimeWait,
            bound: false,
            seeded: false,
        }));
        let t = table(&a, By::Process, Sort::TimeWait, 10, &ctx(), &mut |_| None);
        assert!(!t.contains('\x1b'), "{t:?}");
        assert!(t.contains("\\e[31mred\\nx[7]"), "{t}");
        assert_eq!(t.lines().filter(|l| l.contains("[7]")).count(), 1, "{t}");
    }

    #[test]
    fn table_fits_80_columns_and_flags_loss() {
        let a = agg();
        let mut c = ctx();
        c.loss.ring_full = 3;
        c.close_wait = vec![CloseWait {
            netns: 0,
            pid: 7,
            comm: "leaky".into(),
            sockets: 12,
            listener_port: None,
        }];
        let t = table(&a, By::Peer, Sort::TimeWait, 10, &c, &mut |_| None);
        assert!(t.contains("INCOMPLETE: 3 events lost"), "{t}");
        assert!(
            t.contains("10.0.0.2:6379                  4       5     0.5       1   60.5s api[42]"),
            "{t}"
        );
        assert!(t.contains("leaky[7]: 12"));
        for line in t.lines() {
            assert!(line.len() <= 80, "{line}");
        }
    }
}
