//! The aggregate as Prometheus metrics (docs/metrics.md is the contract), encoded with
//! prometheus-client at scrape time from the current state.
//!
//! Label cardinality is bounded: per grouping, at most `max_series` keys are exported, and
//! they follow what matters now: the largest by TIME_WAIT, with hysteresis (a key outside
//! replaces the smallest exported one only when it holds a quarter more, plus one), so series
//! do not flap. An exported key is pinned in the aggregate (never folded) while exported.
//! Everything else is summed into `key="other"`: the totals minus what the exported keys
//! gained while exported, so `other`'s counters never go back, whichever keys come and go
//! (a key that joins leaves in `other` what `other` already showed of it, and counts the rest;
//! one that leaves gives back what it gained). Every per-group series carries the inode number of its network namespace
//! (`netns`); `twtrace_netns_info` names them. The kernel's own figures are per namespace too,
//! for at most `max_series` namespaces (most TIME_WAIT first).
//!
//! `twtrace_peer_port_usage_ratio` is computed for every outgoing destination, whatever is
//! exported: per (source address, destination) within its namespace, over that namespace's
//! usable ports; a destination's value is its busiest source's. The `max_series` highest are
//! exported (the same hysteresis, and the highest of all always). Accepted connections hold
//! the listener's port, not an ephemeral one: they never get a ratio.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::SocketAddr,
};

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder},
    metrics::MetricType,
};

use crate::{
    present::report::{Context, NsContext},
    track::aggregate::{Aggregator, By, Key, REASONS},
    track::lifecycle::FailReason,
};

/// An exported key, and what its group had counted when it joined (already in `other`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Exported {
    key: Key,
    base_entered: u64,
    base_exits: [u64; 4],
    base_failures: [u64; 6],
}

/// Which keys are exported, per grouping, and which destinations have a usage ratio series.
#[derive(Debug, Default)]
pub struct Exporter {
    pub max_series: usize,
    exported: [Vec<Exported>; By::ALL.len()],
    ratios: Vec<(u32, SocketAddr)>,
    /// Per grouping, the counts of every group not exported at the last scrape: what `other`
    /// showed of each. A key that joins leaves that much in `other` (its base); what it counted
    /// since then was never shown in `other` and goes to the key alone.
    shown_in_other: [HashMap<Key, Counts>; By::ALL.len()],
}

/// A group's counters: births, ends per reason, failed connects per reason.
type Counts = (u64, [u64; 4], [u64; 6]);

/// Version and kernel for twtrace_build_info.
#[derive(Debug, Clone, Default)]
pub struct BuildInfo {
    pub version: String,
    pub kernel: String,
}

/// How much an outsider must exceed the weakest member to replace it: a quarter more, plus
/// `plus` (1 socket for counts, 0.01 for ratios).
fn beats(outsider: f64, member: f64, plus: f64) -> bool {
    outsider > member * 1.25 + plus
}

/// Sticky top-`n`: fills `current` with the best outsiders, then replaces its weakest member
/// while the best outsider `beats` it (or, with `keep_best`, is the best of all). Candidates
/// are (key, score, tie-break); a member missing from them scores 0. Returns (added, removed).
fn follow<K: Clone + Ord>(
    current: &mut Vec<K>,
    candidates: Vec<(K, f64, u64)>,
    n: usize,
    plus: f64,
    keep_best: bool,
) -> (Vec<K>, Vec<K>) {
    let score: BTreeMap<K, (f64, u64)> = candidates
        .iter()
        .map(|(k, s, t)| (k.clone(), (*s, *t)))
        .collect();
    let of = |k: &K| score.get(k).copied().unwrap_or((0.0, 0));
    let rank = |a: &(K, f64, u64), b: &(K, f64, u64)| {
        b.1.total_cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0))
    };
    let mut outsiders: Vec<(K, f64, u64)> = candidates
        .into_iter()
        .filter(|(k, _, _)| !current.contains(k))
        .collect();
    outsiders.sort_by(rank);
    let best_member = current.iter().map(|k| of(k).0).fold(f64::MIN, f64::max);
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for (i, (k, s, _)) in outsiders.into_iter().enumerate() {
        if current.len() < n {
            current.push(k.clone());
            added.push(k);
            continue;
        }
        let Some(w) = current
            .iter()
            .enumerate()
            .min_by(|(_, a), (_, b)| {
                let (sa, sb) = (of(a), of(b));
                sa.0.total_cmp(&sb.0).then(sa.1.cmp(&sb.1)).then(b.cmp(a))
            })
            .map(|(i, _)| i)
        else {
            break;
        };
        let weakest = of(&current[w]).0;
        if beats(s, weakest, plus) || (keep_best && i == 0 && s > best_member) {
            removed.push(std::mem::replace(&mut current[w], k.clone()));
            added.push(k);
        } else {
            break;
        }
    }
    (added, removed)
}

impl Exporter {
    pub fn new(max_series: usize) -> Self {
        Self {
            max_series,
            exported: Default::default(),
            ratios: Vec::new(),
            shown_in_other: Default::default(),
        }
    }

    /// A namespace that is gone: its series end (the aggregate folded its groups into
    /// `other`; what they gained while exported goes back to `other`: no counter goes back).
    pub fn forget_netns(&mut self, netns: u32) {
        for list in &mut self.exported {
            list.retain(|e| e.key.netns != netns);
        }
        for shown in &mut self.shown_in_other {
            shown.retain(|k, _| k.netns != netns);
        }
        self.ratios.retain(|&(n, _)| n != netns);
    }

    /// The exported keys follow the largest groups now (see the module's comment).
    fn refresh(&mut self, agg: &mut Aggregator) {
        for by in By::ALL {
            let list = &mut self.exported[by as usize];
            let mut keys: Vec<Key> = list.iter().map(|e| e.key.clone()).collect();
            let candidates: Vec<(Key, f64, u64)> = agg
                .groups(by)
                .0
                .into_iter()
                .map(|(k, g)| (k.clone(), g.in_time_wait as f64, g.entered))
                .collect();
            let (added, removed) = follow(&mut keys, candidates, self.max_series, 1.0, false);
            for k in &removed {
                agg.unpin(by, k);
            }
            list.retain(|e| !removed.contains(&e.key));
            let shown = &mut self.shown_in_other[by as usize];
            for k in added {
                if !agg.pin(by, &k) {
                    continue;
                }
                let (base_entered, base_exits, base_failures) =
                    shown.get(&k).copied().unwrap_or_default();
                list.push(Exported {
                    key: k,
                    base_entered,
                    base_exits,
                    base_failures,
                });
            }
            // What `other` shows of each group now, for the keys that join later.
            shown.clear();
            for (k, g) in agg.groups(by).0 {
                if !list.iter().any(|e| &e.key == k) {
                    shown.insert(k.clone(), (g.entered, g.exits, g.connect_failures));
                }
            }
        }
    }

    /// The destinations whose usage ratio is exported, with it: (namespace, destination,
    /// ratio), the `max_series` highest, sticky.
    fn ratios(&mut self, agg: &Aggregator, ctx: &Context) -> Vec<(u32, SocketAddr, f64)> {
        let ports = |netns: u32| {
            ctx.namespaces
                .iter()
                .find(|n| n.netns == netns)
                .and_then(|n| n.ephemeral_ports)
                .filter(|&p| p > 0)
        };
        let candidates: Vec<((u32, SocketAddr), f64, u64)> = agg
            .destinations()
            .into_iter()
            .filter_map(|d| {
                let p = ports(d.netns)?;
                Some((
                    (d.netns, d.destination),
                    d.in_time_wait as f64 / p as f64,
                    d.in_time_wait as u64,
                ))
            })
            .collect();
        let value: BTreeMap<(u32, SocketAddr), f64> =
            candidates.iter().map(|(k, r, _)| (*k, *r)).collect();
        follow(&mut self.ratios, candidates, self.max_series, 0.01, true);
        // A destination whose namespace's ports cannot be read has no ratio to show.
        self.ratios.retain(|(netns, _)| ports(*netns).is_some());
        self.ratios
            .iter()
            .map(|&(netns, d)| (netns, d, value.get(&(netns, d)).copied().unwrap_or(0.0)))
            .collect()
    }
}

/// One metric family being written: its samples, label set by label set.
pub(crate) struct Family<'a, 'e> {
    enc: MetricEncoder<'e>,
    _p: std::marker::PhantomData<&'a ()>,
}

/// Labels of one sample.
pub(crate) type Labels = [(&'static str, String)];

/// `group`, `key` and `netns` of an exported group.
fn group_labels(by: By, key: &Key) -> Vec<(&'static str, String)> {
    vec![
        ("group", by.as_str().into()),
        ("key", key.to_string()),
        ("netns", key.netns.to_string()),
    ]
}

/// The `other` group of a grouping (it spans namespaces: no `netns`).
fn other_labels(by: By) -> Vec<(&'static str, String)> {
    vec![("group", by.as_str().into()), ("key", "other".into())]
}

impl Family<'_, '_> {
    pub(crate) fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
        &mut self,
        labels: &Labels,
        v: V,
    ) -> fmt::Result {
        self.enc.encode_family(&labels.to_vec())?.encode_gauge(&v)
    }

    pub(crate) fn counter<V: prometheus_client::encoding::EncodeCounterValue>(
        &mut self,
        labels: &Labels,
        v: V,
    ) -> fmt::Result {
        self.enc
            .encode_family(&labels.to_vec())?
            .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&v, None)
    }
}

pub(crate) fn family<'a, 'e>(
    enc: &'e mut DescriptorEncoder<'a>,
    name: &'e str,
    help: &str,
    ty: MetricType,
) -> Result<Family<'a, 'e>, fmt::Error> {
    Ok(Family {
        enc: enc.encode_descriptor(name, help, None, ty)?,
        _p: std::marker::PhantomData,
    })
}

/// A histogram sample through the EncodeMetric trait (the encoder's own API).
struct Histogram<'a> {
    sum: f64,
    count: u64,
    buckets: &'a [(f64, u64)],
}

impl EncodeMetric for Histogram<'_> {
    fn encode(&self, mut encoder: MetricEncoder) -> fmt::Result {
        // Cumulative counts per upper bound, as the text format wants.
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum,
            self.count,
            self.buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Writes every metric of docs/metrics.md.
pub fn encode(
    enc: &mut DescriptorEncoder,
    exporter: &mut Exporter,
    agg: &mut Aggregator,
    ctx: &Context,
    info: &BuildInfo,
) -> fmt::Result {
    exporter.refresh(agg);
    let t = agg.totals().clone();

    let mut f = family(
        enc,
        "twtrace_timewait_sockets",
        "TIME_WAIT sockets now, per group",
        MetricType::Gauge,
    )?;
    let group = |by: By, key: &Key| agg.group(by, key).cloned().unwrap_or_default();
    for by in By::ALL {
        let keys = &exporter.exported[by as usize];
        let mut sum = 0;
        for e in keys {
            let n = group(by, &e.key).in_time_wait;
            sum += n;
            f.gauge(&group_labels(by, &e.key), n)?;
        }
        if agg.groups(by).0.len() > keys.len() || agg.folded_groups(by) > 0 {
            f.gauge(&other_labels(by), t.in_time_wait.saturating_sub(sum))?;
        }
    }

    let mut f = family(
        enc,
        "twtrace_timewait_fin_wait2_sockets",
        "Timewait sockets now in the FIN_WAIT2 substate (closed first, the peer's FIN not in yet), per group",
        MetricType::Gauge,
    )?;
    for by in By::ALL {
        let keys = &exporter.exported[by as usize];
        let mut sum = 0;
        for e in keys {
            let n = group(by, &e.key).in_fin_wait2;
            sum += n;
            f.gauge(&group_labels(by, &e.key), n)?;
        }
        if agg.groups(by).0.len() > keys.len() || agg.folded_groups(by) > 0 {
            f.gauge(&other_labels(by), t.in_fin_wait2.saturating_sub(sum))?;
        }
    }

    let mut f = family(
        enc,
        "twtrace_timewait_entered",
        "TIME_WAIT births since start, per group",
        MetricType::Counter,
    )?;
    for by in By::ALL {
        let keys = &exporter.exported[by as usize];
        // What the exported keys gained while exported: not `other`'s.
        let mut gained = 0;
        for e in keys {
            let n = group(by, &e.key).entered;
            gained += n.saturating_sub(e.base_entered);
            f.counter(&group_labels(by, &e.key), n)?;
        }
        f.counter(&other_labels(by), t.entered.saturating_sub(gained))?;
    }

    let mut f = family(
        enc,
        "twtrace_timewait_exited",
        "TIME_WAIT ends since start, per group and reason",
        MetricType::Counter,
    )?;
    for by in By::ALL {
        let keys = &exporter.exported[by as usize];
        for (i, reason) in REASONS.iter().enumerate() {
            let mut gained = 0;
            for e in keys {
                let n = group(by, &e.key).exits[i];
                gained += n.saturating_sub(e.base_exits[i]);
                let mut labels = group_labels(by, &e.key);
                labels.push(("reason", reason.as_str().into()));
                f.counter(&labels, n)?;
            }
            let mut labels = other_labels(by);
            labels.push(("reason", reason.as_str().into()));
            f.counter(&labels, t.exits[i].saturating_sub(gained))?;
        }
    }

    let mut f = family(
        enc,
        "twtrace_connect_failures",
        "connect() calls that never connected since start, per group and reason",
        MetricType::Counter,
    )?;
    for by in By::ALL {
        let keys = &exporter.exported[by as usize];
        for reason in FailReason::ALL {
            let i = reason.index();
            let mut gained = 0;
            for e in keys {
                let n = group(by, &e.key).connect_failures[i];
                gained += n.saturating_sub(e.base_failures[i]);
                let mut labels = group_labels(by, &e.key);
                labels.push(("reason", reason.as_str().into()));
                f.counter(&labels, n)?;
            }
            let mut labels = other_labels(by);
            labels.push(("reason", reason.as_str().into()));
            f.counter(&labels, t.connect_failures[i].saturating_sub(gained))?;
        }
    }

    let (buckets, count) = t.lifetime_histogram();
    let hist = Histogram {
        sum: t.lifetime_sum_ms as f64 / 1000.0,
        count,
        buckets: &buckets,
    };
    hist.encode(enc.encode_descriptor(
        "twtrace_timewait_lifetime_seconds",
        "Lifetimes of ended TIME_WAIT sockets",
        None,
        MetricType::Histogram,
    )?)?;

    let mut f = family(
        enc,
        "twtrace_closewait_sockets",
        "CLOSE_WAIT sockets now, per holding process (it never called close())",
        MetricType::Gauge,
    )?;
    for c in ctx.close_wait.iter().take(exporter.max_series) {
        f.gauge(
            &[
                ("pid", c.pid.to_string()),
                ("comm", c.comm.clone()),
                ("netns", c.netns.to_string()),
                (
                    "listener_port",
                    c.listener_port.map(|p| p.to_string()).unwrap_or_default(),
                ),
            ],
            c.sockets,
        )?;
    }

    family(
        enc,
        "twtrace_host_timewait_sockets",
        "TIME_WAIT sockets now, as twtrace counts them, all namespaces",
        MetricType::Gauge,
    )?
    .gauge(&[], t.in_time_wait)?;
    family(
        enc,
        "twtrace_host_timewait_fin_wait2_sockets",
        "Timewait sockets now in the FIN_WAIT2 substate, all namespaces (sockstat's tw counts them with TIME_WAIT)",
        MetricType::Gauge,
    )?
    .gauge(&[], t.in_fin_wait2)?;
    let mut f = family(
        enc,
        "twtrace_host_connect_failures",
        "connect() calls that never connected since start, all namespaces, per reason",
        MetricType::Counter,
    )?;
    for reason in FailReason::ALL {
        f.counter(
            &[("reason", reason.as_str().into())],
            t.connect_failures[reason.index()],
        )?;
    }

    // The namespaces in play, most TIME_WAIT first, at most max_series of them.
    let mut namespaces: Vec<(&NsContext, u64)> = ctx
        .namespaces
        .iter()
        .map(|n| {
            let tw = agg
                .namespaces()
                .find(|&(i, _)| i == n.netns)
                .map_or(0, |(_, tw)| tw);
            (n, tw)
        })
        .collect();
    namespaces.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.netns.cmp(&b.0.netns)));
    namespaces.truncate(exporter.max_series);
    let ns_label = |n: &NsContext| vec![("netns", n.netns.to_string())];
    let mut f = family(
        enc,
        "twtrace_netns_info",
        "Network namespaces twtrace reports on, by inode number, with their best name",
        MetricType::Gauge,
    )?;
    for (n, _) in &namespaces {
        f.gauge(
            &[("netns", n.netns.to_string()), ("name", n.name.clone())],
            1u64,
        )?;
    }
    let mut f = family(
        enc,
        "twtrace_kernel_timewait_sockets",
        "TIME_WAIT sockets now, as the kernel counts them (/proc/net/sockstat tw), per namespace",
        MetricType::Gauge,
    )?;
    for (n, _) in &namespaces {
        if let Some(k) = n.kernel_time_wait {
            f.gauge(&ns_label(n), k)?;
        }
    }
    family(
        enc,
        "twtrace_netns_unreadable",
        "Network namespaces whose kernel figures and CLOSE_WAIT twtrace cannot read (no privilege to enter them)",
        MetricType::Gauge,
    )?
    .gauge(&[], ctx.unreadable as u64)?;
    family(
        enc,
        "twtrace_host_timewait_entered",
        "TIME_WAIT births on the host since start",
        MetricType::Counter,
    )?
    .counter(&[], t.entered)?;
    let mut f = family(
        enc,
        "twtrace_host_timewait_exited",
        "TIME_WAIT ends on the host since start, per reason",
        MetricType::Counter,
    )?;
    for (i, reason) in REASONS.iter().enumerate() {
        f.counter(&[("reason", reason.as_str().into())], t.exits[i])?;
    }
    let mut f = family(
        enc,
        "twtrace_timewait_skipped",
        "TIME_WAIT not created because tcp_max_tw_buckets was full (TcpExt TCPTimeWaitOverflow since start), per namespace",
        MetricType::Counter,
    )?;
    for (n, _) in &namespaces {
        f.counter(&ns_label(n), n.skipped_overflow)?;
    }
    let mut f = family(
        enc,
        "twtrace_timewait_max_buckets",
        "net.ipv4.tcp_max_tw_buckets, per namespace",
        MetricType::Gauge,
    )?;
    for (n, _) in &namespaces {
        if let Some(m) = n.max_tw_buckets {
            f.gauge(&ns_label(n), m)?;
        }
    }
    let mut f = family(
        enc,
        "twtrace_ephemeral_ports",
        "Usable ports in net.ipv4.ip_local_port_range (minus reserved ports), per namespace",
        MetricType::Gauge,
    )?;
    for (n, _) in &namespaces {
        if let Some(p) = n.ephemeral_ports {
            f.gauge(&ns_label(n), p)?;
        }
    }
    let ratios = exporter.ratios(agg, ctx);
    let mut f = family(
        enc,
        "twtrace_peer_port_usage_ratio",
        "TIME_WAIT sockets held towards an outgoing destination by its busiest source address / ephemeral ports of its namespace",
        MetricType::Gauge,
    )?;
    for (netns, destination, ratio) in ratios {
        f.gauge(
            &[
                ("key", destination.to_string()),
                ("netns", netns.to_string()),
            ],
            ratio,
        )?;
    }
    let mut f = family(
        enc,
        "twtrace_events_lost",
        "Events twtrace did not see, per cause",
        MetricType::Counter,
    )?;
    f.counter(&[("cause", "ring_full".into())], ctx.loss.ring_full)?;
    f.counter(&[("cause", "recursion".into())], ctx.loss.recursion_misses)?;
    f.counter(&[("cause", "malformed".into())], ctx.loss.malformed)?;
    f.counter(&[("cause", "unjoined".into())], ctx.loss.unjoined)?;
    family(
        enc,
        "twtrace_build_info",
        "twtrace version and the kernel it runs on",
        MetricType::Gauge,
    )?
    .gauge(
        &[
            ("version", info.version.clone()),
            ("kernel", info.kernel.clone()),
        ],
        1u64,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use prometheus_client::{collector::Collector, registry::Registry};

    use super::*;
    use crate::{
        kernel::decode::{Conn, Role},
        track::lifecycle::{Event, Reason, TwEnter, TwExit},
    };

    #[derive(Debug)]
    struct Fixture(Arc<Mutex<(Exporter, Aggregator, Context, BuildInfo)>>);

    impl Collector for Fixture {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            let mut s = self.0.lock().unwrap();
            let (e, a, c, i) = &mut *s;
            encode(&mut enc, e, a, c, i)
        }
    }

    fn text(state: &Arc<Mutex<(Exporter, Aggregator, Context, BuildInfo)>>) -> String {
        let mut r = Registry::default();
        r.register_collector(Box::new(Fixture(state.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    const NS: u32 = 4026531840;

    fn enter(timer: u64, port: u16, peer: &str, role: Role) -> Event {
        enter_from("10.0.0.1", timer, port, peer, role)
    }

    fn enter_from(source: &str, timer: u64, port: u16, peer: &str, role: Role) -> Event {
        Event::Enter(TwEnter {
            netns: NS,
            ts_ns: 0,
            timer,
            conn: Conn {
                local: format!("{source}:{port}").parse().unwrap(),
                remote: peer.parse().unwrap(),
            },
            owner: None,
            role,
            timeout_jiffies: 0,
            substate: crate::track::lifecycle::Substate::TimeWait,
            bound: false,
            seeded: false,
        })
    }

    fn ctx_with_ports(ports: u32) -> Context {
        Context {
            namespaces: vec![NsContext {
                netns: NS,
                name: "host".into(),
                kernel_time_wait: None,
                ephemeral_ports: Some(ports),
                max_tw_buckets: None,
                skipped_overflow: 0,
            }],
            ..Context::default()
        }
    }

    fn state(
        agg: Aggregator,
        ctx: Context,
        max: usize,
    ) -> Arc<Mutex<(Exporter, Aggregator, Context, BuildInfo)>> {
        Arc::new(Mutex::new((
            Exporter::new(max),
            agg,
            ctx,
            BuildInfo::default(),
        )))
    }

    /// The value of one sample line, by its name and labels as written.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// The repro: 2 series, 3 connections to one destination and 2 to another, a
    /// scrape, then 800 to a third: it is exported at the next scrape, with its ratio, and no
    /// counter of `other` goes back while keys come and go.
    #[test]
    fn exported_keys_follow_the_busiest_and_other_never_goes_back() {
        let mut agg = Aggregator::new(100);
        agg.track_ports();
        let mut timer = 0;
        let mut births = |agg: &mut Aggregator, peer: &str, n: u64| {
            for _ in 0..n {
                timer += 1;
                agg.on_event(&enter(
                    timer,
                    (timer % 60000) as u16 + 1,
                    peer,
                    Role::Connected,
                ));
            }
        };
        births(&mut agg, "127.0.0.1:19311", 3);
        births(&mut agg, "127.0.0.2:19312", 2);
        let st = state(agg, ctx_with_ports(1000), 2);
        let mut last_other = 0.0;
        let mut check_other = |t: &str| {
            let o = sample(
                t,
                "twtrace_timewait_entered_total{group=\"peer\",key=\"other\"}",
            )
            .unwrap();
            assert!(
                o >= last_other,
                "other went back from {last_other} to {o}:\n{t}"
            );
            last_other = o;
        };
        check_other(&text(&st));
        births(&mut st.lock().unwrap().1, "127.0.0.3:19313", 800);
        let t = text(&st);
        check_other(&t);
        let busy = "{group=\"peer\",key=\"127.0.0.3:19313\",netns=\"4026531840\"}";
        assert_eq!(
            sample(&t, &format!("twtrace_timewait_sockets{busy}")),
            Some(800.0),
            "{t}"
        );
        assert_eq!(
            sample(
                &t,
                "twtrace_peer_port_usage_ratio{key=\"127.0.0.3:19313\",netns=\"4026531840\"}"
            ),
            Some(0.8),
            "{t}"
        );
        // Hysteresis: one more socket for the destination left out does not bring it back.
        births(&mut st.lock().unwrap().1, "127.0.0.2:19312", 2);
        let t = text(&st);
        check_other(&t);
        assert!(t.contains("key=\"127.0.0.1:19311\""), "{t}");
        assert!(!t.contains("key=\"127.0.0.2:19312\""), "{t}");
        // Many keys coming and going: `other` only ever grows.
        for round in 0..20u64 {
            let peer = format!("127.0.1.{}:80", round % 7);
            births(&mut st.lock().unwrap().1, &peer, 50 * (round % 5 + 1));
            check_other(&text(&st));
        }
    }

    /// Four source addresses, 150 TIME_WAIT each towards one destination, 200 ports: each
    /// source has its own 200 ports, so the destination is at 0.75, not 3.0. Inbound peers get
    /// no ratio, and the highest is exported even when it is not an exported peer.
    #[test]
    fn usage_ratio_is_the_busiest_source_s_and_only_outgoing() {
        let mut agg = Aggregator::new(100);
        agg.track_ports();
        let mut timer = 0;
        for source in ["10.79.0.1", "10.79.0.2", "10.79.0.3", "10.79.0.4"] {
            for i in 0..150u16 {
                timer += 1;
                agg.on_event(&enter_from(
                    source,
                    timer,
                    40000 + i,
                    "10.79.0.100:80",
                    Role::Connected,
                ));
            }
        }
        // A client of ours closing first on a listening port: inbound, no ratio.
        for i in 0..190u16 {
            timer += 1;
            agg.on_event(&enter(
                timer,
                443,
                &format!("10.9.9.9:{}", 30000 + i),
                Role::Accepted,
            ));
        }
        // Many small destinations fill the exported peer keys; a busy one comes last.
        for d in 0..5u16 {
            for i in 0..30u16 {
                timer += 1;
                agg.on_event(&enter(
                    timer,
                    41000 + i,
                    &format!("10.1.0.{d}:80"),
                    Role::Connected,
                ));
            }
        }
        for i in 0..190u16 {
            timer += 1;
            agg.on_event(&enter(timer, 42000 + i, "10.2.0.1:6379", Role::Connected));
        }
        let st = state(agg, ctx_with_ports(200), 2);
        let t = text(&st);
        let ratio = |t: &str, key: &str| {
            sample(
                t,
                &format!("twtrace_peer_port_usage_ratio{{key=\"{key}\",netns=\"4026531840\"}}"),
            )
        };
        assert_eq!(ratio(&t, "10.2.0.1:6379"), Some(0.95), "{t}");
        assert_eq!(ratio(&t, "10.79.0.100:80"), Some(0.75), "{t}");
        assert!(!t.contains("10.9.9.9"), "inbound peers get no ratio: {t}");
        assert_eq!(
            t.lines()
                .filter(|l| l.starts_with("twtrace_peer_port_usage_ratio{"))
                .count(),
            2,
            "{t}"
        );
    }

    #[test]
    fn series_are_bounded_and_other_sums_the_rest() {
        let mut agg = Aggregator::new(100);
        agg.track_ports();
        let mut timer = 0;
        for (peer, n) in [("10.0.0.2:80", 5), ("10.0.0.3:80", 3), ("10.0.0.4:80", 1)] {
            for _ in 0..n {
                timer += 1;
                let conn = Conn {
                    local: format!("10.0.0.1:{}", 40000 + timer).parse().unwrap(),
                    remote: peer.parse().unwrap(),
                };
                agg.on_event(&Event::Enter(TwEnter {
                    netns: NS,
                    ts_ns: 0,
                    timer,
                    conn,
                    owner: None,
                    role: Role::Connected,
                    timeout_jiffies: 0,
                    substate: crate::track::lifecycle::Substate::TimeWait,
                    bound: false,
                    seeded: false,
                }));
                if timer == 1 {
                    agg.on_event(&Event::Exit(TwExit {
                        netns: NS,
                        ts_ns: 1,
                        timer,
                        conn: Some(conn),
                        owner: None,
                        role: Role::Connected,
                        reason: Reason::Expired,
                        lifetime_ns: Some(60_400_000_000),
                        substate: crate::track::lifecycle::Substate::TimeWait,
                        seeded: false,
                    }));
                }
            }
        }
        let ctx = Context {
            namespaces: vec![NsContext {
                netns: NS,
                name: "host".into(),
                kernel_time_wait: Some(8),
                ephemeral_ports: Some(100),
                max_tw_buckets: Some(131072),
                skipped_overflow: 0,
            }],
            ..Context::default()
        };
        let info = BuildInfo {
            version: "0.1.0".into(),
            kernel: "6.18".into(),
        };
        let state = Arc::new(Mutex::new((Exporter::new(2), agg, ctx, info)));
        let t = text(&state);
        assert!(
            t.contains("twtrace_timewait_sockets{group=\"peer\",key=\"10.0.0.2:80\",netns=\"4026531840\"} 4"),
            "{t}"
        );
        assert!(t.contains(
            "twtrace_timewait_sockets{group=\"peer\",key=\"10.0.0.3:80\",netns=\"4026531840\"} 3"
        ));
        assert!(t.contains("twtrace_timewait_sockets{group=\"peer\",key=\"other\"} 1"));
        assert!(!t.contains("10.0.0.4:80\""), "over max_series: {t}");
        assert!(t.contains("twtrace_timewait_entered_total{group=\"peer\",key=\"other\"} 1"));
        assert!(t.contains(
            "twtrace_timewait_exited_total{group=\"peer\",key=\"10.0.0.2:80\",netns=\"4026531840\",reason=\"expired\"} 1"
        ));
        assert!(t.contains("twtrace_host_timewait_sockets 8"));
        assert!(t.contains("twtrace_kernel_timewait_sockets{netns=\"4026531840\"} 8"));
        assert!(
            t.contains("twtrace_timewait_lifetime_seconds_bucket{le=\"60.5\"} 1"),
            "{t}"
        );
        assert!(t.contains("twtrace_timewait_lifetime_seconds_count 1"));
        assert!(
            t.contains(
                "twtrace_peer_port_usage_ratio{key=\"10.0.0.2:80\",netns=\"4026531840\"} 0.04"
            ),
            "{t}"
        );
        assert!(
            t.contains("twtrace_build_info{version=\"0.1.0\",kernel=\"6.18\"} 1"),
            "{t}"
        );
        assert!(t.contains("twtrace_events_lost_total{cause=\"ring_full\"} 0"));
        // What matters now: a larger peer replaces the smallest exported one; `other` goes
        // on up (the leaver gives back what it gained; the newcomer's births came after the
        // last scrape: `other` never showed them, they are the newcomer's alone).
        {
            let mut s = state.lock().unwrap();
            for i in 0..10 {
                s.1.on_event(&enter(
                    100 + i,
                    50000 + i as u16,
                    "10.0.0.9:80",
                    Role::Connected,
                ));
            }
        }
        let t = text(&state);
        assert!(!t.contains("key=\"10.0.0.3:80\""), "{t}");
        assert!(t.contains(
            "twtrace_timewait_sockets{group=\"peer\",key=\"10.0.0.9:80\",netns=\"4026531840\"} 10"
        ), "{t}");
        assert!(
            t.contains("twtrace_timewait_sockets{group=\"peer\",key=\"other\"} 4"),
            "{t}"
        );
        assert!(
            t.contains("twtrace_timewait_entered_total{group=\"peer\",key=\"other\"} 4"),
            "{t}"
        );
    }
}
