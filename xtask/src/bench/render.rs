//! Rendering: the table printed at the end (the figures, then the targets next to them) and the
//! JSON of each run and of each scenario's summary, for target/bench.

use super::{
    bootstrap::Estimate,
    load::Run,
    scenario::Kind,
    stats::{median, Summary},
    Opts, TARGET_CPU_MS_PER_1K, TARGET_RATIO, TARGET_RSS_MB, TARGET_SHARE, TARGET_STATE_NS,
    TARGET_TIMER_NS,
};
use crate::json::{num, obj, opt, Json};

pub(super) fn f0(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => group_digits(x.round() as i64),
        _ => "-".into(),
    }
}

fn f1(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.1}"),
        _ => "-".into(),
    }
}

fn f2(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.2}"),
        _ => "-".into(),
    }
}

fn f3(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.3}"),
        _ => "-".into(),
    }
}

fn group_digits(n: i64) -> String {
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// A share in %, with its interval: `1.23 % [1.10..1.40]`.
fn pct(e: Option<Estimate>) -> String {
    match e {
        Some(e) => format!(
            "{:.2} % [{:.2}..{:.2}]",
            e.value * 100.0,
            e.lo * 100.0,
            e.hi * 100.0
        ),
        None => "-".into(),
    }
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = v.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "meets",
        Some(false) => "MISSES",
        None => "-",
    }
}

pub(super) fn table(sums: &[Summary], skipped: &[String], o: &Opts) -> String {
    let mut t = String::new();
    let mut line = |s: String| {
        t.push_str(&s);
        t.push('\n');
    };
    line(format!(
        "twtrace bench: {} interleaved A/B pairs x {} s per run; load: twt-loadgen, {} client + {} \
         server threads, client closes first, IPv4 loopback, fresh netns per run",
        o.repeats, o.seconds, o.threads, o.threads
    ));
    line(String::new());
    line(
        "throughput, connections/s (median of runs); ratio = median of per-pair B/A [min..max]; \
         mean of them [95 % bootstrap interval]"
            .into(),
    );
    line(format!(
        "  {:<20} {:>9} {:>9} {:>7}  {:<15} {:>7}  {:<15}",
        "scenario", "alone", "traced", "ratio", "[min..max]", "mean", "[95 % interval]"
    ));
    for s in sums {
        let spread = s
            .ratio_spread
            .map_or("-".into(), |(a, b)| format!("[{a:.3}..{b:.3}]"));
        let ci = s
            .ratio_ci
            .map_or("-".into(), |e| format!("[{:.3}..{:.3}]", e.lo, e.hi));
        line(format!(
            "  {:<20} {:>9} {:>9} {:>7}  {:<15} {:>7}  {:<15} {} pairs, others' CPU {}% (max {}%)",
            s.kind.label(),
            f0(s.a_rate),
            f0(s.b_rate),
            f3(s.ratio),
            spread,
            f3(s.ratio_ci.map(|e| e.value)),
            ci,
            s.pairs,
            f0(s.others_pct),
            f0(s.others_pct_max)
        ));
    }
    for s in skipped {
        line(format!("  {s}"));
    }
    line(String::new());
    line(format!(
        "kernel cost per program (run_time_ns / run_cnt{})",
        if o.bpf_stats {
            " and recursion misses in the cost run, kernel.bpf_stats_enabled=1"
        } else {
            "; --no-bpf-stats: not measured"
        }
    ));
    line(format!(
        "  {:<20} {:<22} {:>8} {:>10} {:>9} {:>10}",
        "scenario", "program", "ns/run", "runs/conn", "ns/conn", "rec.misses"
    ));
    for s in sums {
        let mut first = true;
        let mut name = || {
            if std::mem::replace(&mut first, false) {
                s.kind.label()
            } else {
                ""
            }
        };
        for p in &s.progs {
            line(format!(
                "  {:<20} {:<22} {:>8} {:>10} {:>9} {:>10}",
                name(),
                p.0,
                f1(Some(p.1)),
                f2(Some(p.2)),
                f0(Some(p.3)),
                f0(Some(p.4))
            ));
        }
        if s.kind.twtrace() || s.kind.floor() {
            line(format!(
                "  {:<20} {:<22} {:>8}",
                name(),
                "timer programs (avg)",
                f1(s.timer_ns)
            ));
        }
        line(format!(
            "  {:<20} {:<22} {:>8} {:>10} {:>9}   per event: {} ns",
            name(),
            "all programs",
            "",
            f2(s.runs_per_conn),
            f0(s.kernel_ns_per_conn),
            f0(s.kernel_ns_per_event)
        ));
    }
    // What a program costs beyond entering it: the hooks' programs do nothing, so their run time
    // is the entry and the timing itself.
    if let Some(h) = sums.iter().find(|s| s.kind == Kind::Hooks) {
        for s in sums.iter().filter(|s| s.kind.twtrace()) {
            let less = |x: Option<f64>, floor: Option<f64>| x.zip(floor).map(|(x, f)| x - f);
            line(format!(
                "  {:<20} own work per run, over the hooks' floor: state {} ns, timers {} ns",
                s.kind.label(),
                f1(less(s.state_ns, h.state_ns)),
                f1(less(s.timer_ns, h.timer_ns))
            ));
        }
    }
    line(String::new());
    own_cpu_table(&mut line, sums, o);
    line(String::new());
    line(
        "events (sums over the traced runs; conns: the loadgen's; TcpExt TW: the namespaces'; \
         produced: emitted + ring full; lost: ring full + malformed + recursion misses)"
            .into(),
    );
    line(format!(
        "  {:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6} {:>6} {:>9}",
        "scenario",
        "conns",
        "TcpExt TW",
        "births",
        "produced",
        "received",
        "lost",
        "rec.",
        "IWI/conn"
    ));
    for s in sums {
        let lost = if s.kind.twtrace() {
            f0(s.lost_total)
        } else {
            s.lost_printed.map_or("n/a".into(), |l| f0(Some(l)))
        };
        let births = if s.kind == Kind::Bpftrace {
            // Its count of every state change, for comparison with its run count.
            s.counted
        } else {
            s.births
        };
        line(format!(
            "  {:<20} {:>10} {:>10} {:>10} {:>10} {:>10} {:>6} {:>6} {:>9}",
            s.kind.label(),
            f0(Some(s.connections)),
            f0(Some(s.tw)),
            f0(births),
            f0(s.produced()),
            f0(s.received),
            lost,
            f0(Some(s.recursion)),
            f2(s.iwi_per_conn_b)
        ));
    }
    if sums.iter().any(|s| s.kind == Kind::Bpftrace) {
        line("  (bpftrace: 'births' is the number of state changes its map counted)".into());
    }
    let iwi_a: Vec<f64> = sums.iter().filter_map(|s| s.iwi_per_conn_a).collect();
    line(format!(
        "  untraced runs: {} IRQ-work interrupts per connection (the baseline for IWI/conn)",
        f2(median(&iwi_a))
    ));
    line(String::new());
    line(
        "twtrace userspace (RSS: VmHWM; at attach; growth per 100k TIME_WAIT alive; and projected \
          for 60 s of births at the traced rate, all alive)"
            .into(),
    );
    line(format!(
        "  {:<20} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "scenario",
        "CPU ms per",
        "incl. start",
        "start",
        "peak RSS",
        "at attach",
        "per 100k",
        "projected"
    ));
    line(format!(
        "  {:<20} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "", "1k births", "and exit", "CPU ms", "MB", "MB", "MB", "60 s, MB"
    ));
    for s in sums.iter().filter(|s| s.kind.twtrace()) {
        line(format!(
            "  {:<20} {:>10} {:>12} {:>9} {:>9} {:>9} {:>9} {:>10}",
            s.kind.label(),
            f2(s.cpu_ms_per_1k),
            f2(s.cpu_ms_per_1k_all),
            f0(s.startup_cpu_ms),
            f1(s.rss_mb),
            f1(s.rss_attach_mb),
            f1(s.rss_mb_per_100k),
            f0(s.rss_steady_mb)
        ));
    }
    line(String::new());
    line("targets (from the issue) next to the measured figures".into());
    let tw: Vec<&Summary> = sums.iter().filter(|s| s.kind.twtrace()).collect();
    let mut head = format!("  {:<34} {:>10}", "figure", "target");
    for s in &tw {
        head.push_str(&format!("  {:>18}", s.kind.label()));
    }
    line(head);
    let row = |name: &str, target: &str, f: &dyn Fn(&Summary) -> (String, Option<bool>)| {
        let mut l = format!("  {name:<34} {target:>10}");
        for s in &tw {
            let (v, ok) = f(s);
            l.push_str(&format!("  {:>18}", format!("{v} {}", verdict(ok))));
        }
        l
    };
    line(row("throughput ratio", ">= 0.97", &|s| {
        (f3(s.ratio), s.ratio.map(|r| r >= TARGET_RATIO))
    }));
    line(row("own CPU share of a connection", "<= 1 %", &|s| {
        (
            s.share
                .map_or("-".into(), |e| format!("{:.2} %", e.value * 100.0)),
            s.share.map(|e| e.value <= TARGET_SHARE),
        )
    }));
    line(row("lost events", "0", &|s| {
        (f0(s.lost_total), s.lost_total.map(|l| l == 0.0))
    }));
    line(row("recursion misses", "0", &|s| {
        (f0(Some(s.recursion)), Some(s.recursion == 0.0))
    }));
    line(row("kernel ns per state event", "< 300", &|s| {
        (f1(s.state_ns), s.state_ns.map(|n| n < TARGET_STATE_NS))
    }));
    line(row("kernel ns per timer program run", "< 40", &|s| {
        (f1(s.timer_ns), s.timer_ns.map(|n| n < TARGET_TIMER_NS))
    }));
    line(row("CPU ms per 1,000 births", "< 20", &|s| {
        (
            f2(s.cpu_ms_per_1k),
            s.cpu_ms_per_1k.map(|n| n < TARGET_CPU_MS_PER_1K),
        )
    }));
    // The target is RSS with 100,000 TIME_WAIT sockets tracked: the peak at attach (which
    // includes start-up's transient BTF parsing, so it errs high) plus the growth per 100k
    // alive. The runs' own peak is for however many were alive at their end.
    line(row("RSS MB with 100k TIME_WAIT", "< 50", &|s| {
        let at_100k = s.rss_attach_mb.zip(s.rss_mb_per_100k).map(|(a, g)| a + g);
        (f1(at_100k), at_100k.map(|n| n < TARGET_RSS_MB))
    }));
    let mut check = format!("  {:<34} {:>10}", "sanity: births - connections", "0");
    for s in &tw {
        let d = s.births.map(|b| b - s.connections);
        check.push_str(&format!(
            "  {:>18}",
            d.map_or("-".into(), |d| format!("{:+}", d as i64))
        ));
    }
    line(check);
    let notes: Vec<String> = sums
        .iter()
        .flat_map(|s| {
            s.notes
                .iter()
                .map(move |n| format!("{}: {n}", s.kind.label()))
        })
        .collect();
    if !notes.is_empty() {
        line(String::new());
        line("notes".into());
        for n in notes {
            line(format!("  {n}"));
        }
    }
    t
}

/// Own CPU per connection: the tracer's kernel time over the floor plus its userspace CPU, as
/// a share of what an untraced connection costs the host.
fn own_cpu_table(line: &mut dyn FnMut(String), sums: &[Summary], o: &Opts) {
    if !o.bpf_stats {
        line("own CPU per connection: not measured (--no-bpf-stats: no cost runs)".into());
        return;
    }
    line(
        "own CPU per connection (means over the repeats): kernel = its programs' run time over \
         the hooks' floor (cost runs), user = its userspace CPU per birth (per connection for \
         the peers and refused connects; serve's collector included), over an untraced \
         connection's CPU (A runs: /proc/stat busy time less other processes', steal excluded); \
         share with its 95 % bootstrap interval over the repeats"
            .into(),
    );
    line(format!(
        "  {:<20} {:>10} {:>10} {:>10} {:>26} {:>8}",
        "scenario", "untraced", "kernel", "user", "own share", "repeats"
    ));
    line(format!(
        "  {:<20} {:>10} {:>10} {:>10} {:>26}",
        "", "us/conn", "ns/conn", "ns/conn", "[95 % interval]"
    ));
    for s in sums {
        if s.kind.floor() {
            line(format!(
                "  {:<20} {:>10} {:>10} {:>10} {:>26}   (a floor: all its programs' run time is \
                 {} of a connection's CPU)",
                s.kind.label(),
                "",
                "",
                "",
                "",
                s.kernel_share
                    .map_or("-".into(), |k| format!("{:.2} %", k * 100.0))
            ));
            continue;
        }
        line(format!(
            "  {:<20} {:>10} {:>10} {:>10} {:>26} {:>8}{}",
            s.kind.label(),
            f1(mean(s.own.iter().map(|o| o.conn_ns / 1000.0))),
            f0(mean(s.own.iter().map(|o| o.kernel_ns))),
            f0(mean(s.own.iter().map(|o| o.user_ns))),
            pct(s.share),
            s.own.len(),
            if s.over_floor {
                ""
            } else {
                "  (no floor: the hooks did not run)"
            }
        ));
    }
}

pub(super) fn run_json(r: &Run) -> Json {
    let tracer = r.tracer.as_ref().map_or(Json::Null, |t| {
        obj(vec![
            ("attach_s", num(t.attach_s)),
            ("cpu_ms_at_attach", opt(t.cpu_attach_ms)),
            ("cpu_ms_before_sigint", opt(t.cpu_before_int_ms)),
            ("cpu_ms_total", opt(t.cpu_total_ms)),
            ("children_cpu_ms", num(t.children_cpu_ms)),
            ("vm_hwm_kb", opt(t.hwm_kb.map(|k| k as f64))),
            (
                "vm_hwm_kb_at_attach",
                opt(t.hwm_attach_kb.map(|k| k as f64)),
            ),
            ("stopped", Json::Str(t.stopped.clone())),
            ("stats", t.stats.clone().unwrap_or(Json::Null)),
            (
                "programs",
                Json::Arr(
                    t.progs
                        .iter()
                        .map(|p| {
                            obj(vec![
                                ("name", Json::Str(p.0.clone())),
                                ("run_time_ns", num(p.1)),
                                ("run_cnt", num(p.2)),
                                ("recursion_misses", num(p.3)),
                            ])
                        })
                        .collect(),
                ),
            ),
            ("lost_printed", opt(t.lost_printed)),
            ("counted", opt(t.counted)),
            ("scrapes", num(t.scrapes as f64)),
            ("http_requests", num(t.http_requests as f64)),
            (
                "stderr_tail",
                Json::Arr(t.stderr_tail.iter().cloned().map(Json::Str).collect()),
            ),
        ])
    });
    obj(vec![
        ("side", Json::Str(r.side.to_string())),
        ("repeat", num(r.repeat as f64 + 1.0)),
        ("connections", num(r.connections)),
        ("seconds", num(r.seconds)),
        ("connections_per_s", num(r.rate)),
        ("errors", num(r.errors)),
        (
            "first_error",
            r.first_error.clone().map_or(Json::Null, Json::Str),
        ),
        ("tcpext_tw", num(r.tw as f64)),
        ("tcpext_tw_killed", num(r.tw_killed as f64)),
        ("tcpext_tw_overflow", num(r.tw_overflow as f64)),
        ("tcpext_tw_recycled", num(r.tw_recycled as f64)),
        ("irq_work_interrupts", num(r.irq_work as f64)),
        ("other_processes_cpu_ms", num(r.others_cpu_ms)),
        ("host_busy_cpu_ms", opt(r.busy_ms)),
        ("host_cpu_ns_per_connection", opt(r.host_ns_per_conn())),
        ("tracer", tracer),
    ])
}

pub(super) fn summary_json(s: &Summary) -> Json {
    obj(vec![
        ("median_connections_per_s_alone", opt(s.a_rate)),
        ("median_connections_per_s_traced", opt(s.b_rate)),
        ("ratio_median", opt(s.ratio)),
        ("ratio_min", opt(s.ratio_spread.map(|x| x.0))),
        ("ratio_max", opt(s.ratio_spread.map(|x| x.1))),
        ("ratio_mean", opt(s.ratio_ci.map(|e| e.value))),
        ("ratio_ci95", ci_json(s.ratio_ci)),
        (
            "own_cpu",
            Json::Arr(
                s.own
                    .iter()
                    .map(|o| {
                        obj(vec![
                            ("untraced_connection_ns", num(o.conn_ns)),
                            ("kernel_ns_per_connection_over_floor", num(o.kernel_ns)),
                            ("userspace_ns_per_connection", num(o.user_ns)),
                        ])
                    })
                    .collect(),
            ),
        ),
        ("own_cpu_share", opt(s.share.map(|e| e.value))),
        ("own_cpu_share_ci95", ci_json(s.share)),
        ("kernel_over_floor", Json::Bool(s.over_floor)),
        ("all_programs_share", opt(s.kernel_share)),
        ("pairs", num(s.pairs as f64)),
        ("connections_traced", num(s.connections)),
        ("tcpext_tw_traced", num(s.tw)),
        ("tcpext_tw_overflow", num(s.overflow)),
        (
            "programs",
            Json::Arr(
                s.progs
                    .iter()
                    .map(|p| {
                        obj(vec![
                            ("name", Json::Str(p.0.clone())),
                            ("ns_per_run", num(p.1)),
                            ("runs_per_connection", num(p.2)),
                            ("ns_per_connection", num(p.3)),
                            ("recursion_misses", num(p.4)),
                        ])
                    })
                    .collect(),
            ),
        ),
        ("state_ns_per_run", opt(s.state_ns)),
        ("timer_ns_per_run", opt(s.timer_ns)),
        ("kernel_ns_per_connection", opt(s.kernel_ns_per_conn)),
        ("kernel_ns_per_event", opt(s.kernel_ns_per_event)),
        ("program_runs_per_connection", opt(s.runs_per_conn)),
        ("births", opt(s.births)),
        ("emitted", opt(s.emitted)),
        ("received", opt(s.received)),
        ("ring_full_lost", opt(s.ring_lost)),
        ("malformed", opt(s.malformed)),
        ("recursion_misses", num(s.recursion)),
        ("lost_total", opt(s.lost_total)),
        ("lost_printed", opt(s.lost_printed)),
        ("bpftrace_counted", opt(s.counted)),
        ("cpu_ms_per_1000_births", opt(s.cpu_ms_per_1k)),
        (
            "cpu_ms_per_1000_births_incl_start_exit",
            opt(s.cpu_ms_per_1k_all),
        ),
        ("startup_cpu_ms_median", opt(s.startup_cpu_ms)),
        ("peak_rss_mb", opt(s.rss_mb)),
        ("rss_at_attach_mb", opt(s.rss_attach_mb)),
        ("rss_growth_mb_per_100k_births", opt(s.rss_mb_per_100k)),
        ("rss_projected_60s_of_births_mb", opt(s.rss_steady_mb)),
        ("irq_work_per_connection_alone", opt(s.iwi_per_conn_a)),
        ("irq_work_per_connection_traced", opt(s.iwi_per_conn_b)),
        (
            "notes",
            Json::Arr(s.notes.iter().cloned().map(Json::Str).collect()),
        ),
    ])
}

fn ci_json(e: Option<Estimate>) -> Json {
    e.map_or(Json::Null, |e| Json::Arr(vec![num(e.lo), num(e.hi)]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits() {
        assert_eq!(group_digits(1234567), "1,234,567");
        assert_eq!(group_digits(-999), "-999");
    }
}
