//! Statistics: one scenario's runs (A, B and the cost runs) reduced to medians, per-pair ratios
//! and per-connection costs, the own-CPU share with its interval, and notes on what disturbed
//! them; hands on a `Summary`.

use super::{
    bootstrap::{interval, mean_at, Estimate},
    load::Run,
    scenario::Kind,
    tracer::TracerResult,
};

/// What a program run costs before it does anything, measured with the hooks' empty programs
/// in their cost runs (ns per run, with the timing that bpf stats adds): a tracer's own kernel
/// work is its run time over this.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Floor {
    pub(super) state_ns: f64,
    pub(super) timer_ns: f64,
}

impl Floor {
    pub(super) fn of(runs: &[Run]) -> Option<Floor> {
        let (mut s, mut sn, mut t, mut tn) = (0.0, 0.0, 0.0, 0.0);
        for p in runs
            .iter()
            .filter(|r| r.side == 'C')
            .filter_map(|r| r.tracer.as_ref())
            .flat_map(|t| t.progs.iter())
        {
            if is_state_prog(&p.0) {
                (s, sn) = (s + p.1, sn + p.2);
            } else if is_timer_prog(&p.0) {
                (t, tn) = (t + p.1, tn + p.2);
            }
        }
        (sn > 0.0 && tn > 0.0).then(|| Floor {
            state_ns: s / sn,
            timer_ns: t / tn,
        })
    }

    /// The floor of one run of this program (the mean of both for a program on another hook).
    fn per_run(&self, prog: &str) -> f64 {
        if is_state_prog(prog) {
            self.state_ns
        } else if is_timer_prog(prog) {
            self.timer_ns
        } else {
            (self.state_ns + self.timer_ns) / 2.0
        }
    }
}

fn is_state_prog(name: &str) -> bool {
    name.starts_with("inet_sock_set_s") || name == "handle_set_state" || name == "hook_state"
}

fn is_timer_prog(name: &str) -> bool {
    name.starts_with("timer_") || name.starts_with("hook_timer")
}

/// One repeat's own-CPU figures, ns per connection: an untraced connection's CPU (A), the
/// tracer's userspace CPU (B) and its programs' kernel time over the floor (C).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct OwnCpu {
    pub(super) conn_ns: f64,
    pub(super) user_ns: f64,
    pub(super) kernel_ns: f64,
}

/// The tracer's userspace CPU in a traced run, ns per unit: per birth for twtrace on TIME_WAIT
/// churn, per connection otherwise. Its children (serve's collector) included.
fn user_ns(kind: Kind, r: &Run) -> Option<f64> {
    let t = r.tracer.as_ref()?;
    let ms = t.cpu_before_int_ms? - t.cpu_attach_ms? + t.children_cpu_ms;
    let units = match t.stats.as_ref() {
        Some(s) if kind.twtrace() => s.f(&["births"]),
        _ => r.connections,
    };
    (units > 0.0).then(|| ms * 1e6 / units)
}

/// The programs' kernel time in a cost run over what their runs cost empty, ns per connection.
fn kernel_ns(r: &Run, floor: Option<&Floor>) -> Option<f64> {
    let t = r.tracer.as_ref()?;
    if r.connections <= 0.0 || t.progs.is_empty() {
        return None;
    }
    let ns: f64 = t
        .progs
        .iter()
        .map(|p| p.1 - floor.map_or(0.0, |f| p.2 * f.per_run(&p.0)))
        .sum();
    Some(ns / r.connections)
}

/// The repeats that have all three runs, in order.
pub(super) fn own_cpu(kind: Kind, runs: &[Run], floor: Option<&Floor>) -> Vec<OwnCpu> {
    let last = runs.iter().map(|r| r.repeat).max().map_or(0, |m| m + 1);
    (0..last)
        .filter_map(|rep| {
            let side = |s: char| runs.iter().find(|r| r.repeat == rep && r.side == s);
            Some(OwnCpu {
                conn_ns: side('A')?.host_ns_per_conn()?,
                user_ns: user_ns(kind, side('B')?)?,
                kernel_ns: kernel_ns(side('C')?, floor)?,
            })
        })
        .collect()
}

/// Own CPU per connection (kernel + userspace) over an untraced connection's CPU, a ratio of
/// means, with its interval over the repeats.
pub(super) fn share(own: &[OwnCpu]) -> Option<Estimate> {
    let k: Vec<f64> = own.iter().map(|o| o.kernel_ns).collect();
    let u: Vec<f64> = own.iter().map(|o| o.user_ns).collect();
    let c: Vec<f64> = own.iter().map(|o| o.conn_ns).collect();
    interval(own.len(), &|idx| {
        let conn = mean_at(&c, idx)?;
        (conn > 0.0).then_some((mean_at(&k, idx)? + mean_at(&u, idx)?) / conn)
    })
}

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
    /// The mean of the per-pair ratios and its interval.
    pub(super) ratio_ci: Option<Estimate>,
    pub(super) pairs: usize,
    /// Own CPU per connection, per complete repeat, and its share of an untraced connection's.
    pub(super) own: Vec<OwnCpu>,
    pub(super) share: Option<Estimate>,
    /// Whether the kernel figures are over the hooks' floor (else over nothing: not run).
    pub(super) over_floor: bool,
    /// All programs' kernel time per connection over an untraced connection's CPU: for the
    /// floors, what merely entering their programs costs.
    pub(super) kernel_share: Option<f64>,
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

pub(super) fn summarize(kind: Kind, runs: &[Run], floor: Option<&Floor>) -> Summary {
    let a: Vec<&Run> = runs.iter().filter(|r| r.side == 'A').collect();
    let b: Vec<&Run> = runs.iter().filter(|r| r.side == 'B').collect();
    let ratios: Vec<f64> = runs
        .windows(2)
        .filter(|w| w[0].side == 'A' && w[1].side == 'B' && w[0].rate > 0.0)
        .map(|w| w[1].rate / w[0].rate)
        .collect();
    let rates = |v: &[&Run]| v.iter().map(|r| r.rate).collect::<Vec<_>>();
    let own = if kind.has_share() {
        own_cpu(kind, runs, floor)
    } else {
        Vec::new()
    };
    let conn_ns: Vec<f64> = a.iter().filter_map(|r| r.host_ns_per_conn()).collect();
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
        ratio_ci: interval(ratios.len(), &|idx| mean_at(&ratios, idx)),
        pairs: ratios.len(),
        share: share(&own),
        own,
        over_floor: floor.is_some(),
        kernel_share: match (per_conn(all_ns), median(&conn_ns)) {
            (Some(k), Some(c)) if c > 0.0 => Some(k / c),
            _ => None,
        },
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

    fn run(side: char, repeat: usize, connections: f64) -> Run {
        Run {
            scenario: "serve",
            side,
            repeat,
            connections,
            seconds: 1.0,
            rate: connections,
            ..Run::default()
        }
    }

    fn prog(name: &str, ns: f64, cnt: f64) -> (String, f64, f64, f64) {
        (name.into(), ns, cnt, 0.0)
    }

    /// Two repeats of a serve scenario and the hooks' cost run, with figures chosen so that
    /// the share comes out exactly: 1,000 connections each run.
    fn repeats() -> (Vec<Run>, Vec<Run>) {
        let mut runs = Vec::new();
        for (rep, busy_ms, user_ms) in [(0, 150.0, 1.0), (1, 250.0, 3.0)] {
            // A: 150 (250) ms busy, 50 ms of it other processes': 100 (200) us per connection.
            let mut a = run('A', rep, 1000.0);
            a.busy_ms = Some(busy_ms);
            a.others_cpu_ms = 50.0;
            // B: 1 (3) ms of tracer CPU (the collector's 0.5 of it) over 1,000 births.
            let mut b = run('B', rep, 1000.0);
            b.tracer = Some(TracerResult {
                cpu_attach_ms: Some(10.0),
                cpu_before_int_ms: Some(10.0 + user_ms - 0.5),
                children_cpu_ms: 0.5,
                stats: Some(crate::json::Json::parse(r#"{"births": 1000}"#).unwrap()),
                ..TracerResult::default()
            });
            // C: state program 10,000 runs of 100 ns, timers 20,000 of 40 ns.
            let mut c = run('C', rep, 1000.0);
            c.tracer = Some(TracerResult {
                progs: vec![
                    prog("inet_sock_set_state", 1_000_000.0, 10_000.0),
                    prog("timer_start", 800_000.0, 20_000.0),
                ],
                ..TracerResult::default()
            });
            runs.extend([a, b, c]);
        }
        let mut h = run('C', 0, 1000.0);
        h.scenario = "hooks";
        h.tracer = Some(TracerResult {
            progs: vec![
                prog("hook_state", 300_000.0, 10_000.0),
                prog("hook_timer_start", 400_000.0, 20_000.0),
            ],
            ..TracerResult::default()
        });
        (runs, vec![h])
    }

    #[test]
    fn the_floor_is_the_empty_programs_run_time_per_run() {
        let (_, hooks) = repeats();
        assert_eq!(
            Floor::of(&hooks),
            Some(Floor {
                state_ns: 30.0,
                timer_ns: 20.0
            })
        );
    }

    #[test]
    fn own_cpu_is_kernel_over_the_floor_plus_userspace_per_connection() {
        let (runs, hooks) = repeats();
        let floor = Floor::of(&hooks).unwrap();
        let own = own_cpu(Kind::Serve, &runs, Some(&floor));
        // Kernel: (1,000,000 - 10,000 x 30 + 800,000 - 20,000 x 20) / 1,000 = 1,100 ns.
        assert_eq!(
            own,
            vec![
                OwnCpu {
                    conn_ns: 100_000.0,
                    user_ns: 1_000.0,
                    kernel_ns: 1_100.0
                },
                OwnCpu {
                    conn_ns: 200_000.0,
                    user_ns: 3_000.0,
                    kernel_ns: 1_100.0
                },
            ]
        );
        // (1,100 + 2,000) / 150,000: a ratio of means.
        let e = share(&own).unwrap();
        assert!((e.value - 3_100.0 / 150_000.0).abs() < 1e-12, "{e:?}");
        assert!(e.lo <= e.value && e.value <= e.hi, "{e:?}");
        // Every draw is the first repeat twice (0.021), the second twice (0.0205) or both.
        assert!(e.lo >= 0.0205 - 1e-12 && e.hi <= 0.021 + 1e-12, "{e:?}");
        // Without a floor the programs' whole run time counts.
        let bare = own_cpu(Kind::Serve, &runs, None);
        assert_eq!(bare[0].kernel_ns, 1_800.0);
    }

    #[test]
    fn an_incomplete_repeat_is_left_out() {
        let (mut runs, hooks) = repeats();
        runs.retain(|r| !(r.repeat == 1 && r.side == 'C'));
        let own = own_cpu(Kind::Serve, &runs, Floor::of(&hooks).as_ref());
        assert_eq!(own.len(), 1);
        // One repeat: a value but no interval.
        assert_eq!(share(&own), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
