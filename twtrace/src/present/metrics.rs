//! The aggregate as Prometheus metrics (docs/metrics.md is the contract), encoded with
//! prometheus-client at scrape time from the current state.
//!
//! Label cardinality is bounded: per grouping, the first `max_series` keys to appear (largest
//! first) are exported for good and pinned in the aggregate, so their counters never go back;
//! everything else is summed into `key="other"` as totals minus the exported keys, which is
//! monotonic too.

use std::fmt;

use prometheus_client::{
    encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder},
    metrics::MetricType,
};

use crate::{
    present::report::Context,
    track::aggregate::{Aggregator, By, Key, REASONS},
};

/// Which keys are exported, per grouping (sticky).
#[derive(Debug, Default)]
pub struct Exporter {
    pub max_series: usize,
    exported: [Vec<Key>; 4],
}

/// Version and kernel for twtrace_build_info.
#[derive(Debug, Clone, Default)]
pub struct BuildInfo {
    pub version: String,
    pub kernel: String,
    pub max_tw_buckets: Option<u64>,
}

impl Exporter {
    pub fn new(max_series: usize) -> Self {
        Self {
            max_series,
            exported: Default::default(),
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
struct Family<'a, 'e> {
    enc: MetricEncoder<'e>,
    _p: std::marker::PhantomData<&'a ()>,
}

impl Family<'_, '_> {
    fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
        &mut self,
        labels: &[(&str, &str)],
        v: V,
    ) -> fmt::Result {
        self.enc.encode_family(&labels.to_vec())?.encode_gauge(&v)
    }

    fn counter(&mut self, labels: &[(&str, &str)], v: u64) -> fmt::Result {
        self.enc
            .encode_family(&labels.to_vec())?
            .encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&v, None)
    }
}

fn family<'a, 'e>(
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
            f.gauge(&[("group", by.as_str()), ("key", &key.to_string())], n)?;
        }
        if agg.groups(by).0.len() > keys.len() || agg.folded_groups(by) > 0 {
            f.gauge(
                &[("group", by.as_str()), ("key", "other")],
                t.in_time_wait.saturating_sub(sum),
            )?;
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
            f.counter(&[("group", by.as_str()), ("key", &key.to_string())], n)?;
        }
        f.counter(
            &[("group", by.as_str()), ("key", "other")],
            t.entered.saturating_sub(sum),
        )?;
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
                f.counter(
                    &[
                        ("group", by.as_str()),
                        ("key", &key.to_string()),
                        ("reason", reason.as_str()),
                    ],
                    n,
                )?;
            }
            f.counter(
                &[
                    ("group", by.as_str()),
                    ("key", "other"),
                    ("reason", reason.as_str()),
                ],
                t.exits[i].saturating_sub(sum),
            )?;
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
        f.gauge(&[("pid", &c.pid.to_string()), ("comm", &c.comm)], c.sockets)?;
    }

    family(
        enc,
        "twtrace_host_timewait_sockets",
        "TIME_WAIT sockets now, as twtrace counts them",
        MetricType::Gauge,
    )?
    .gauge(&[], t.in_time_wait)?;
    if let Some(k) = ctx.kernel_time_wait {
        family(
            enc,
            "twtrace_kernel_timewait_sockets",
            "TIME_WAIT sockets now, as the kernel counts them (/proc/net/sockstat tw)",
            MetricType::Gauge,
        )?
        .gauge(&[], k)?;
    }
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
        f.counter(&[("reason", reason.as_str())], t.exits[i])?;
    }
    family(
        enc,
        "twtrace_timewait_skipped",
        "TIME_WAIT not created because tcp_max_tw_buckets was full (TcpExt TCPTimeWaitOverflow since start)",
        MetricType::Counter,
    )?
    .counter(&[], ctx.skipped_overflow)?;
    if let Some(m) = info.max_tw_buckets {
        family(
            enc,
            "twtrace_timewait_max_buckets",
            "net.ipv4.tcp_max_tw_buckets",
            MetricType::Gauge,
        )?
        .gauge(&[], m)?;
    }
    if let Some(ports) = ctx.ephemeral_ports {
        family(
            enc,
            "twtrace_ephemeral_ports",
            "Usable ports in net.ipv4.ip_local_port_range",
            MetricType::Gauge,
        )?
        .gauge(&[], ports)?;
        let mut f = family(
            enc,
            "twtrace_peer_port_usage_ratio",
            "TIME_WAIT sockets held towards a destination / ephemeral ports",
            MetricType::Gauge,
        )?;
        for key in &exporter.exported[By::Peer as usize] {
            let n = agg.group(By::Peer, key).map_or(0, |g| g.in_time_wait);
            f.gauge(&[("key", &key.to_string())], n as f64 / ports.max(1) as f64)?;
        }
    }
    let mut f = family(
        enc,
        "twtrace_events_lost",
        "Events twtrace did not see, per cause",
        MetricType::Counter,
    )?;
    f.counter(&[("cause", "ring_full")], ctx.loss.ring_full)?;
    f.counter(&[("cause", "recursion")], ctx.loss.recursion_misses)?;
    f.counter(&[("cause", "malformed")], ctx.loss.malformed)?;
    family(
        enc,
        "twtrace_build_info",
        "twtrace version and the kernel it runs on",
        MetricType::Gauge,
    )?
    .gauge(
        &[("version", &info.version), ("kernel", &info.kernel)],
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
                    ts_ns: 0,
                    timer,
                    conn,
                    owner: None,
                    role: Role::Connected,
                    timeout_jiffies: 0,
                    seeded: false,
                }));
                if timer == 1 {
                    agg.on_event(&Event::Exit(TwExit {
                        ts_ns: 1,
                        timer,
                        conn: Some(conn),
                        owner: None,
                        role: Role::Connected,
                        reason: Reason::Expired,
                        lifetime_ns: Some(60_400_000_000),
                        seeded: false,
                    }));
                }
            }
        }
        let ctx = Context {
            ephemeral_ports: Some(100),
            kernel_time_wait: Some(8),
            ..Context::default()
        };
        let info = BuildInfo {
            version: "0.1.0".into(),
            kernel: "6.18".into(),
            max_tw_buckets: Some(131072),
        };
        let state = Arc::new(Mutex::new((Exporter::new(2), agg, ctx, info)));
        let t = text(&state);
        assert!(
            t.contains("twtrace_timewait_sockets{group=\"peer\",key=\"10.0.0.2:80\"} 4"),
            "{t}"
        );
        assert!(t.contains("twtrace_timewait_sockets{group=\"peer\",key=\"10.0.0.3:80\"} 3"));
        assert!(t.contains("twtrace_timewait_sockets{group=\"peer\",key=\"other\"} 1"));
        assert!(!t.contains("10.0.0.4:80\""), "over max_series: {t}");
        assert!(t.contains("twtrace_timewait_entered_total{group=\"peer\",key=\"other\"} 1"));
        assert!(t.contains(
            "twtrace_timewait_exited_total{group=\"peer\",key=\"10.0.0.2:80\",reason=\"expired\"} 1"
        ));
        assert!(t.contains("twtrace_host_timewait_sockets 8"));
        assert!(t.contains("twtrace_kernel_timewait_sockets 8"));
        assert!(
            t.contains("twtrace_timewait_lifetime_seconds_bucket{le=\"60.5\"} 1"),
            "{t}"
        );
        assert!(t.contains("twtrace_timewait_lifetime_seconds_count 1"));
        assert!(
            t.contains("twtrace_peer_port_usage_ratio{key=\"10.0.0.2:80\"} 0.04"),
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
                    ts_ns: 0,
                    timer: 100 + i,
                    conn: Conn {
                        local: format!("10.0.0.1:{}", 50000 + i).parse().unwrap(),
                        remote: "10.0.0.9:80".parse().unwrap(),
                    },
                    owner: None,
                    role: Role::Connected,
                    timeout_jiffies: 0,
                    seeded: false,
                }));
            }
        }
        let t = text(&state);
        assert!(t.contains("key=\"10.0.0.3:80\"} 3"));
        assert!(
            t.contains("twtrace_timewait_sockets{group=\"peer\",key=\"other\"} 11"),
            "{t}"
        );
    }
}
