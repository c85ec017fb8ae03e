//! The aggregate as Prometheus metrics (docs/metrics.md is the contract), encoded with
//! prometheus-client at scrape time from the current state.
//!
//! Label cardinality is bounded: per grouping, the first `max_series` keys to appear (largest
//! first) are exported and pinned in the aggregate, so their counters never go back, until
//! their network namespace is gone; everything else is summed into `key="other"` as totals
//! minus the exported keys, which is monotonic too. Every per-group series carries the inode
//! number of its network namespace (`netns`); `twtrace_netns_info` names them. The kernel's own
//! figures are per namespace too, for at most `max_series` namespaces (most TIME_WAIT first).

use std::fmt;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder},
    metrics::MetricType,
};

use crate::{
    present::report::{Context, NsContext},
    track::aggregate::{Aggregator, By, Key, REASONS},
    track::lifecycle::FailReason,
};

/// Which keys are exported, per grouping (sticky while their namespace lives).
#[derive(Debug, Default)]
pub struct Exporter {
    pub max_series: usize,
    exported: [Vec<Key>; By::ALL.len()],
}

/// Version and kernel for twtrace_build_info.
#[derive(Debug, Clone, Default)]
pub struct BuildInfo {
    pub version: String,
    pub kernel: String,
}

impl Exporter {
    pub fn new(max_series: usize) -> Self {
        Self {
            max_series,
            exported: Default::default(),
        }
    }

    /// A namespace that is gone: its series end (the aggregate folded its groups into
    /// `other`, which grows by as much: no counter goes back).
    pub fn forget_netns(&mut self, netns: u32) {
        for list in &mut self.exported {
            list.retain(|k| k.netns != netns);
        }
    }

    /// Adds the largest not-yet-exported groups until `max_series` keys are exported.
    fn refresh(&mut self, agg: &mut Aggregator) {
        for by in By::ALL {
            let list = &mut self.exported[by as usize];
            if list.len() >= self.max_series {
                continue;
            }
            let (groups, _) = agg.groups(by);
            let mut candidates: Vec<(u64, u64, Key)> = groups
                .into_iter()
                .filter(|(k, _)| !list.contains(k))
                .map(|(k, g)| (g.in_time_wait, g.entered, k.clone()))
                .collect();
            candidates.sort_by(|a, b| (b.0, b.1).cmp(&(a.0, a.1)).then(a.2.cmp(&b.2)));
            for (_, _, key) in candidates {
                if list.len() >= self.max_series {
                    break;
                }
                if agg.pin(by, &key) {
                    list.push(key);
                }
            }
        }
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
    for by in By::ALL {
        let keys = &exporter.exported[by as usize];
        let mut sum = 0;
        for key in keys {
            let n = agg.group(by, key).map_or(0, |g| g.in_time_wait);
            sum += n;
            f.gauge(&group_labels(by, key), n)?;
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
        for key in keys {
            let n = agg.group(by, key).map_or(0, |g| g.in_fin_wait2);
            sum += n;
            f.gauge(&group_labels(by, key), n)?;
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
        let mut sum = 0;
        for key in keys {
            let n = agg.group(by, key).map_or(0, |g| g.entered);
            sum += n;
            f.counter(&group_labels(by, key), n)?;
        }
        f.counter(&other_labels(by), t.entered.saturating_sub(sum))?;
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
            let mut sum = 0;
            for key in keys {
                let n = agg.group(by, key).map_or(0, |g| g.exits[i]);
                sum += n;
                let mut labels = group_labels(by, key);
                labels.push(("reason", reason.as_str().into()));
                f.counter(&labels, n)?;
            }
            let mut labels = other_labels(by);
            labels.push(("reason", reason.as_str().into()));
            f.counter(&labels, t.exits[i].saturating_sub(sum))?;
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
            let mut sum = 0;
            for key in keys {
                let n = agg.group(by, key).map_or(0, |g| g.connect_failures[i]);
                sum += n;
                let mut labels = group_labels(by, key);
                labels.push(("reason", reason.as_str().into()));
                f.counter(&labels, n)?;
            }
            let mut labels = other_labels(by);
            labels.push(("reason", reason.as_str().into()));
            f.counter(&labels, t.connect_failures[i].saturating_sub(sum))?;
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
    let mut f = family(
        enc,
        "twtrace_peer_port_usage_ratio",
        "TIME_WAIT sockets held towards a destination / ephemeral ports of its namespace",
        MetricType::Gauge,
    )?;
    for key in &exporter.exported[By::Peer as usize] {
        let ports = ctx
            .namespaces
            .iter()
            .find(|n| n.netns == key.netns)
            .and_then(|n| n.ephemeral_ports);
        if let Some(ports) = ports {
            let n = agg.group(By::Peer, key).map_or(0, |g| g.in_time_wait);
            f.gauge(
                &[("key", key.to_string()), ("netns", key.netns.to_string())],
                n as f64 / ports.max(1) as f64,
            )?;
        }
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

    #[test]
    fn series_are_bounded_and_other_sums_the_rest() {
        let mut agg = Aggregator::new(100);
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
        // Sticky: a new, larger peer does not push an exported key out.
        {
            let mut s = state.lock().unwrap();
            for i in 0..10 {
                s.1.on_event(&Event::Enter(TwEnter {
                    netns: NS,
                    ts_ns: 0,
                    timer: 100 + i,
                    conn: Conn {
                        local: format!("10.0.0.1:{}", 50000 + i).parse().unwrap(),
                        remote: "10.0.0.9:80".parse().unwrap(),
                    },
                    owner: None,
                    role: Role::Connected,
                    timeout_jiffies: 0,
                    substate: crate::track::lifecycle::Substate::TimeWait,
                    bound: false,
                    seeded: false,
                }));
            }
        }
        let t = text(&state);
        assert!(t.contains("key=\"10.0.0.3:80\",netns=\"4026531840\"} 3"));
        assert!(
            t.contains("twtrace_timewait_sockets{group=\"peer\",key=\"other\"} 11"),
            "{t}"
        );
    }
}
