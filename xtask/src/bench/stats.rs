//! Statistics: one scenario's runs (A, B and the cost run) reduced to medians, per-pair ratios
//! and per-connection costs, with notes on what disturbed them; hands on a `Summary`.

use super::{load::Run, scenario::Kind, tracer::TracerResult};

pub(super) fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn min_max(v: &[f64]) -> Option<(f64, f64)> {
    let min = v.iter().copied().reduce(f64::min)?;
    let max = v.iter().copied().reduce(f64::max)?;
    Some((min, max))
}

/// Everything printed for one scenario, from its runs.
pub(super) struct Summary {
    pub(super) kind: Kind,
    pub(super) a_rate: Option<f64>,
    pub(super) b_rate: Option<f64>,
    pub(super) ratio: Option<f64>,
    pub(super) ratio_spread: Option<(f64, f64)>,
    pub(super) pairs: usize,
    pub(super) connections: f64,
    pub(super) tw: f64,
    pub(super) overflow: f64,
    /// Per program: name, ns per run, runs per connection, ns per connection, recursion misses.
    pub(super) progs: Vec<(String, f64, f64, f64, f64)>,
    pub(super) state_ns: Option<f64>,
    pub(super) timer_ns: Option<f64>,
    pub(super) kernel_ns_per_conn: Option<f64>,
    pub(super) kernel_ns_per_event: Option<f64>,
    pub(super) runs_per_conn: Option<f64>,
    // twtrace
    pub(super) births: Option<f64>,
    pub(super) emitted: Option<f64>,
    pub(super) received: Option<f64>,
    pub(super) ring_lost: Option<f64>,
    pub(super) malformed: Option<f64>,
    pub(super) recursion: f64,
    pub(super) lost_total: Option<f64>,
    pub(super) cpu_ms_per_1k: Option<f64>,
    pub(super) cpu_ms_per_1k_all: Option<f64>,
    pub(super) startup_cpu_ms: Option<f64>,
    pub(super) rss_mb: Option<f64>,
    pub(super) rss_attach_mb: Option<f64>,
    pub(super) rss_mb_per_100k: Option<f64>,
    pub(super) rss_steady_mb: Option<f64>,
    // peers
    pub(super) lost_printed: Option<f64>,
    pub(super) counted: Option<f64>,
    pub(super) iwi_per_conn_a: Option<f64>,
    pub(super) iwi_per_conn_b: Option<f64>,
    /// Other processes' CPU during the runs, % of one CPU: median and max over the runs.
    pub(super) others_pct: Option<f64>,
    pub(super) others_pct_max: Option<f64>,
    pub(super) notes: Vec<String>,
}

impl Summary {
    /// Events the kernel programs produced: emitted plus those that found the ring full.
    pub(super) fn produced(&self) -> Option<f64> {
        match (self.emitted, self.ring_lost) {
            (Some(e), Some(l)) => Some(e + l),
            _ => None,
        }
    }
}

pub(super) fn summarize(kind: Kind, runs: &[Run]) -> Summary {
    let a: Vec<&Run> = runs.iter().filter(|r| r.side == 'A').collect();
    let b: Vec<&Run> = runs.iter().filter(|r| r.side == 'B').collect();
    let ratios: Vec<f64> = runs
        .windows(2)
        .filter(|w| w[0].side == 'A' && w[1].side == 'B' && w[0].rate > 0.0)
        .map(|w| w[1].rate / w[0].rate)
        .collect();
    let rates = |v: &[&Run]| v.iter().map(|r| r.rate).collect::<Vec<_>>();
    let conns: f64 = b.iter().map(|r| r.connections).sum();
    let trs: Vec<&TracerResult> = b.iter().filter_map(|r| r.tracer.as_ref()).collect();
    // Each program's cost comes from the cost run: bpf stats are on only then (run counts too
    // are only kept then). Without one (--no-bpf-stats), no cost figures.
    let cost_runs: Vec<&Run> = runs.iter().filter(|r| r.side == 'C').collect();
    let cost_conns: f64 = cost_runs.iter().map(|r| r.connections).sum();
    let per_conn = |x: f64| {
        if cost_conns > 0.0 {
            Some(x / cost_conns)
        } else {
            None
        }
    };
    let cost_trs: Vec<&TracerResult> = cost_runs.iter().filter_map(|r| r.tracer.as_ref()).collect();
    // Recursion misses are counted whether or not stats are on: those of the pairs' runs, like
    // the other losses.
    let recursion: f64 = trs.iter().flat_map(|t| t.progs.iter().map(|p| p.3)).sum();
    // Programs, summed over runs by name.
    let mut names: Vec<String> = Vec::new();
    for t in &cost_trs {
        for p in &t.progs {
            if !names.contains(&p.0) {
                names.push(p.0.clone());
            }
        }
    }
    let sum_prog = |pred: &dyn Fn(&str) -> bool| {
        let (mut ns, mut cnt, mut rec) = (0.0, 0.0, 0.0);
        for t in &cost_trs {
            for p in t.progs.iter().filter(|p| pred(&p.0)) {
                ns += p.1;
                cnt += p.2;
                rec += p.3;
            }
        }
        (ns, cnt, rec)
    };
    let mut progs = Vec::new();
    for n in &names {
        let (ns, cnt, rec) = sum_prog(&|p: &str| p == n);
        progs.push((
            n.clone(),
            if cnt > 0.0 { ns / cnt } else { f64::NAN },
            per_conn(cnt).unwrap_or(f64::NAN),
            per_conn(ns).unwrap_or(f64::NAN),
            rec,
        ));
    }
    let (all_ns, all_cnt, _) = sum_prog(&|_| true);
    let (st_ns, st_cnt, _) = sum_prog(&|p: &str| {
        p.starts_with("inet_sock_set_s") || p == "handle_set_state" || p == "hook_state"
    });
    let (tm_ns, tm_cnt, _) =
        sum_prog(&|p: &str| p.starts_with("timer_") || p.starts_with("hook_timer"));
    let ratio_of = |n: f64, d: f64| if d > 0.0 { Some(n / d) } else { None };
    let stat_sum = |path: &[&str]| -> Option<f64> {
        let v: Vec<f64> = trs
            .iter()
            .filter_map(|t| t.stats.as_ref().map(|s| s.f(path)))
            .collect();
        if v.is_empty() {
            None
        } else {
            Some(v.iter().sum())
        }
    };
    let births = stat_sum(&["births"]);
    let emitted = stat_sum(&["kernel", "emitted"]);
    let ring_lost = stat_sum(&["kernel", "lost"]);
    let malformed = stat_sum(&["malformed"]);
    // twtrace's CPU: between attach and SIGINT (the steady cost of the load) and in all.
    let steady: Vec<(f64, f64)> = trs
        .iter()
        .filter_map(|t| {
            let b = t.stats.as_ref()?.f(&["births"]);
            Some((t.cpu_before_int_ms? - t.cpu_attach_ms?, b))
        })
        .collect();
    let all: Vec<(f64, f64)> = trs
        .iter()
        .filter_map(|t| {
            let b = t.stats.as_ref()?.f(&["births"]);
            Some((t.cpu_total_ms.or(t.cpu_before_int_ms)?, b))
        })
        .collect();
    let per_1k = |v: &[(f64, f64)]| {
        let ms: f64 = v.iter().map(|x| x.0).sum();
        let b: f64 = v.iter().map(|x| x.1).sum();
        ratio_of(ms * 1000.0, b)
    };
    let startup: Vec<f64> = trs.iter().filter_map(|t| t.cpu_attach_ms).collect();
    let hwm = trs.iter().filter_map(|t| t.hwm_kb).max();
    // Memory grows with the TIME_WAIT sockets alive (one entry each until it ends, 60 s):
    // the growth per birth in these short runs, and what it comes to once a full minute of
    // births at this rate is alive.
    let growth: Vec<f64> = trs
        .iter()
        .filter_map(|t| {
            let b = t.stats.as_ref()?.f(&["births"]);
            let d = t.hwm_kb? as f64 - t.hwm_attach_kb? as f64;
            (b > 0.0).then(|| d / b)
        })
        .collect();
    let base: Vec<f64> = trs
        .iter()
        .filter_map(|t| t.hwm_attach_kb.map(|k| k as f64))
        .collect();
    let kb_per_birth = median(&growth);
    let b_rate = median(&rates(&b));
    let rss_steady_mb = match (kb_per_birth, median(&base), b_rate) {
        (Some(g), Some(base), Some(r)) if kind.twtrace() => Some((base + g * r * 60.0) / 1024.0),
        _ => None,
    };
    let a_conns: f64 = a.iter().map(|r| r.connections).sum();
    let a_iwi: f64 = a.iter().map(|r| r.irq_work as f64).sum();
    let b_iwi: f64 = b.iter().map(|r| r.irq_work as f64).sum();
    let others: Vec<f64> = runs
        .iter()
        .filter(|r| r.side != 'C' && r.seconds > 0.0)
        .map(|r| r.others_cpu_ms / r.seconds / 10.0)
        .collect();
    let mut notes = Vec::new();
    let busy = others.iter().filter(|p| **p > 5.0).count();
    if busy > 0 {
        notes.push(format!(
            "{busy} of {} runs shared the host with other processes using more than 5 % of a CPU \
             (up to {:.0} %): those pairs are noisier",
            others.len(),
            min_max(&others).map_or(0.0, |m| m.1)
        ));
    }
    for r in runs {
        let run = if r.side == 'C' {
            "cost run".to_owned()
        } else {
            format!("run {}{}", r.side, r.repeat + 1)
        };
        if r.errors > 0.0 {
            notes.push(format!(
                "{run}: {} loadgen errors (first: {})",
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            ));
        }
        if r.side == 'A' && r.irq_work as f64 > r.connections / 100.0 {
            notes.push(format!(
                "{run}: {} IRQ-work interrupts with nothing of ours attached: another BPF tool \
                 was busy on the host during this untraced run",
                r.irq_work
            ));
        }
        if let Some(t) = &r.tracer {
            if !t.stopped.starts_with("SIGINT") || t.stopped.contains('(') {
                notes.push(format!("{run}: tracer {}", t.stopped));
            }
            // A floor traces nothing: no births to compare.
            if let Some(st) = t.stats.as_ref().filter(|_| kind.twtrace()) {
                let extra = st.f(&["births"]) - r.connections;
                if extra > 0.0 {
                    let http = if t.http_requests > 0 {
                        format!(
                            " ({} of them may be the HTTP requests this bench made to serve, \
                             each leaves a TIME_WAIT on the host)",
                            t.http_requests
                        )
                    } else {
                        String::new()
                    };
                    notes.push(format!(
                        "{run}: {} births more than the loadgen's connections: TIME_WAIT made \
                         by other traffic on the host while it ran (twtrace sees every \
                         namespace){http}",
                        extra
                    ));
                } else if extra < 0.0 {
                    notes.push(format!(
                        "{run}: {} births FEWER than the loadgen's connections",
                        -extra
                    ));
                }
            }
        }
    }
    Summary {
        kind,
        a_rate: median(&rates(&a)),
        b_rate: median(&rates(&b)),
        ratio: median(&ratios),
        ratio_spread: min_max(&ratios),
        pairs: ratios.len(),
        connections: conns,
        tw: b.iter().map(|r| r.tw as f64).sum(),
        overflow: b.iter().map(|r| r.tw_overflow as f64).sum(),
        progs,
        state_ns: ratio_of(st_ns, st_cnt),
        timer_ns: ratio_of(tm_ns, tm_cnt),
        kernel_ns_per_conn: per_conn(all_ns),
        kernel_ns_per_event: if kind.twtrace() {
            let cost_events: f64 = cost_trs
                .iter()
                .filter_map(|t| t.stats.as_ref())
                .map(|s| s.f(&["kernel", "emitted"]) + s.f(&["kernel", "lost"]))
                .sum();
            ratio_of(all_ns, cost_events)
        } else {
            ratio_of(all_ns, all_cnt)
        },
        runs_per_conn: per_conn(all_cnt),
        births,
        emitted,
        received: stat_sum(&["received"]),
        ring_lost,
        malformed,
        recursion,
        lost_total: if kind.twtrace() {
            Some(ring_lost.unwrap_or(0.0) + malformed.unwrap_or(0.0) + recursion)
        } else {
            None
        },
        cpu_ms_per_1k: per_1k(&steady),
        cpu_ms_per_1k_all: per_1k(&all),
        startup_cpu_ms: median(&startup),
        rss_mb: hwm.map(|k| k as f64 / 1024.0),
        rss_attach_mb: median(&base).map(|k| k / 1024.0),
        rss_mb_per_100k: kb_per_birth.map(|k| k * 100_000.0 / 1024.0),
        rss_steady_mb,
        lost_printed: {
            let v: Vec<f64> = trs.iter().filter_map(|t| t.lost_printed).collect();
            if v.is_empty() {
                None
            } else {
                Some(v.iter().sum())
            }
        },
        counted: {
            let v: Vec<f64> = trs.iter().filter_map(|t| t.counted).collect();
            if v.is_empty() {
                None
            } else {
                Some(v.iter().sum())
            }
        },
        iwi_per_conn_a: ratio_of(a_iwi, a_conns),
        iwi_per_conn_b: ratio_of(b_iwi, conns),
        others_pct: median(&others),
        others_pct_max: min_max(&others).map(|m| m.1),
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
