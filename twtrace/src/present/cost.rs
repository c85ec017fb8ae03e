//! serve's own cost as metrics, as ebpf_exporter shows its own (docs/metrics.md): each kernel
//! program's runs, run time and recursion misses, the ring buffer's size, fill and records, and
//! the process's CPU, memory and descriptors (the standard `process_*` metrics, read by the
//! `metrics-process` crate and encoded here: prometheus-client has no process collector of its
//! own, and the one crate written for it, kubert-prometheus-process, is built against an older
//! prometheus-client, 0.23, whose registry this one cannot take).

use std::fmt;

use prometheus_client::{encoding::DescriptorEncoder, metrics::MetricType};

use crate::{
    present::metrics::{Family, family},
    track::session::OwnCost,
};

/// Reads, once, what the process metrics keep for the process's life (the page size and clock
/// ticks, from the aux vector): to be called before serve drops its privileges. After the drop
/// to `--user` the process is no longer dumpable, so /proc/self/auxv is root's (mode 0400), and
/// kernels before 6.4 have no PR_GET_AUXV: rustix, under metrics-process, would panic on every
/// scrape (it did on 6.1 and 5.10).
pub fn prepare() {
    let _ = metrics_process::collector::collect();
}

/// Writes the own-cost metrics of docs/metrics.md.
pub fn encode(enc: &mut DescriptorEncoder, cost: &OwnCost) -> fmt::Result {
    let prog = |name: &str| [("program", name.to_owned())];
    let counting = cost.bpf_stats_enabled.unwrap_or(false);
    family(
        enc,
        "twtrace_bpf_stats_enabled",
        "Whether kernel.bpf_stats_enabled is 1: only then does the kernel count program runs and their time",
        MetricType::Gauge,
    )?
    .gauge(&[], u64::from(counting))?;
    let mut f = family(
        enc,
        "twtrace_program_runs",
        "Runs of each kernel program (counted while kernel.bpf_stats_enabled is 1)",
        MetricType::Counter,
    )?;
    for p in &cost.programs {
        f.counter(&prog(p.name), p.run_cnt)?;
    }
    let mut f = family(
        enc,
        "twtrace_program_run_seconds",
        "Time the kernel spent in each program (counted while kernel.bpf_stats_enabled is 1)",
        MetricType::Counter,
    )?;
    for p in &cost.programs {
        f.counter(&prog(p.name), p.run_time_ns as f64 / 1e9)?;
    }
    let mut f = family(
        enc,
        "twtrace_program_recursion_misses",
        "Runs of each program the kernel skipped because one was already running on that CPU (each may have carried an event)",
        MetricType::Counter,
    )?;
    for p in &cost.programs {
        f.counter(&prog(p.name), p.recursion_misses)?;
    }
    family(
        enc,
        "twtrace_ring_buffer_size_bytes",
        "Size of the ring buffer between the kernel programs and twtrace (--ring-size)",
        MetricType::Gauge,
    )?
    .gauge(&[], cost.ring_size)?;
    family(
        enc,
        "twtrace_ring_buffer_fill_ratio",
        "The most the ring buffer held, as a share of its size, over the last second (1: full, events are being lost)",
        MetricType::Gauge,
    )?
    .gauge(
        &[],
        cost.ring_fill_peak as f64 / cost.ring_size.max(1) as f64,
    )?;
    family(
        enc,
        "twtrace_ring_buffer_records",
        "Records read from the ring buffer since start",
        MetricType::Counter,
    )?
    .counter(&[], cost.received)?;
    family(
        enc,
        "twtrace_closewait_scan_seconds",
        "How long the last CLOSE_WAIT scan took (sock_diag in each namespace, /proc for the holders)",
        MetricType::Gauge,
    )?
    .gauge(&[], cost.closewait_scan_seconds)?;
    process(enc, &metrics_process::collector::collect())
}

/// The standard process metrics, named as every Prometheus client names them.
fn process(enc: &mut DescriptorEncoder, m: &metrics_process::collector::Metrics) -> fmt::Result {
    let gauges: [(&str, &str, Option<u64>); 7] = [
        (
            "process_open_fds",
            "Number of open file descriptors.",
            m.open_fds,
        ),
        (
            "process_max_fds",
            "Maximum number of open file descriptors.",
            m.max_fds,
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            m.virtual_memory_bytes,
        ),
        (
            "process_virtual_memory_max_bytes",
            "Maximum amount of virtual memory available in bytes.",
            m.virtual_memory_max_bytes,
        ),
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            m.resident_memory_bytes,
        ),
        (
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            m.start_time_seconds,
        ),
        (
            "process_threads",
            "Number of OS threads in the process.",
            m.threads,
        ),
    ];
    if let Some(cpu) = m.cpu_seconds_total {
        family(
            enc,
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            MetricType::Counter,
        )?
        .counter(&[], cpu)?;
    }
    for (name, help, v) in gauges {
        if let Some(v) = v {
            let mut f: Family = family(enc, name, help, MetricType::Gauge)?;
            f.gauge(&[], v)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use prometheus_client::{collector::Collector, registry::Registry};

    use super::*;
    use crate::kernel::probes::ProgramStats;

    #[derive(Debug)]
    struct Fixture(Arc<Mutex<OwnCost>>);

    impl Collector for Fixture {
        fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
            encode(&mut enc, &self.0.lock().unwrap())
        }
    }

    #[test]
    fn programs_ring_and_process() {
        let cost = OwnCost {
            programs: vec![ProgramStats {
                name: "inet_sock_set_state",
                id: 7,
                run_time_ns: 2_500_000_000,
                run_cnt: 1000,
                recursion_misses: 3,
            }],
            bpf_stats_enabled: Some(true),
            ring_size: 4 << 20,
            ring_fill_peak: 1 << 20,
            received: 42,
            closewait_scan_seconds: 0.004,
        };
        let mut r = Registry::default();
        r.register_collector(Box::new(Fixture(Arc::new(Mutex::new(cost)))));
        let mut t = String::new();
        prometheus_client::encoding::text::encode(&mut t, &r).unwrap();
        for want in [
            "twtrace_bpf_stats_enabled 1",
            "twtrace_program_runs_total{program=\"inet_sock_set_state\"} 1000",
            "twtrace_program_run_seconds_total{program=\"inet_sock_set_state\"} 2.5",
            "twtrace_program_recursion_misses_total{program=\"inet_sock_set_state\"} 3",
            "twtrace_ring_buffer_size_bytes 4194304",
            "twtrace_ring_buffer_fill_ratio 0.25",
            "twtrace_ring_buffer_records_total 42",
            "twtrace_closewait_scan_seconds 0.004",
            "# TYPE process_cpu_seconds counter",
            "process_resident_memory_bytes ",
            "process_open_fds ",
        ] {
            assert!(t.contains(want), "{want} missing from:\n{t}");
        }
    }
}
