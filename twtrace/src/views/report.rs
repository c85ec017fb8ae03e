//! `twtrace report`: collect for a while, then print who made the TIME_WAIT.

use std::{
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use crate::{
    cli::ReportArgs,
    host::clock,
    host::{cgroup::CgroupNames, collect::Request, netns},
    present::report::{self, Context, NsContext},
    track::aggregate::Aggregator,
    track::session::{self, Session},
};

/// The namespaces a view reports on: those `--netns` named, else every namespace the aggregate
/// saw TIME_WAIT in, and twtrace's own.
pub fn in_play(agg: &Aggregator, netns_filter: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = if netns_filter.is_empty() {
        agg.namespaces()
            .map(|(n, _)| n)
            .chain(netns::own())
            .collect()
    } else {
        netns_filter.to_vec()
    };
    v.sort_unstable();
    v.dedup();
    v
}

/// What to ask the host for: the kernel figures of the namespaces in play and, when
/// `close_wait`, the CLOSE_WAIT holders (of the `--netns` namespaces, or of all).
pub fn request(agg: &Aggregator, netns_filter: &[u32], close_wait: bool) -> Request {
    Request {
        figures: Some(in_play(agg, netns_filter)),
        close_wait: close_wait.then(|| netns_filter.to_vec()),
    }
}

/// Everything a report needs besides the aggregate, from what the session last gathered.
pub fn context(
    session: &Session,
    agg: &Aggregator,
    netns_filter: &[u32],
    started: Instant,
) -> Context {
    let host = &session.host;
    let namespaces = in_play(agg, netns_filter)
        .into_iter()
        .map(|netns| {
            let f = host.ledger.latest(netns);
            NsContext {
                netns,
                name: host.label(netns),
                kernel_time_wait: f.and_then(|f| f.sockstat_tw),
                skipped_overflow: host.ledger.since_start(netns).map_or(0, |c| c.overflow),
                ephemeral_ports: f.and_then(|f| f.settings.ephemeral_ports()),
                max_tw_buckets: f.and_then(|f| f.settings.max_tw_buckets),
            }
        })
        .collect();
    Context {
        duration_s: started.elapsed().as_secs_f64(),
        now_sec: clock::monotonic_ns() / 1_000_000_000,
        loss: session.loss(),
        namespaces,
        unreadable: host.unreadable(agg.namespaces()),
        close_wait: host.close_wait.clone(),
    }
}

pub async fn run(args: ReportArgs) -> anyhow::Result<()> {
    let filter = args.filter.to_filter();
    let mut session = Session::start(args.probe.options(), true)?;
    let mut agg = Aggregator::new(args.group.max_groups);
    agg.set_listening_ports(session.listening.clone());
    let started = Instant::now();
    eprintln!(
        "twtrace: collecting for {}s; Ctrl-C to stop early",
        args.duration.as_secs_f64()
    );
    let progress = std::io::stderr().is_terminal();
    let stop = session::stop_signal(Some(args.duration));
    tokio::pin!(stop);
    let mut last_tick = Instant::now();
    loop {
        let events = tokio::select! {
            r = &mut stop => { r?; break; }
            r = session.next() => r?,
        };
        for ev in events.iter().filter(|e| filter.matches(e)) {
            agg.on_event(ev);
        }
        if last_tick.elapsed() >= Duration::from_secs(1) {
            last_tick = Instant::now();
            agg.tick();
            if progress {
                let t = agg.totals();
                eprint!(
                    "\rtwtrace: collecting {:>4.0}/{}s: {} births, {} in TIME_WAIT ",
                    started.elapsed().as_secs_f64(),
                    args.duration.as_secs(),
                    t.entered,
                    t.in_time_wait
                );
            }
        }
    }
    for ev in session.finish().iter().filter(|e| filter.matches(e)) {
        agg.on_event(ev);
    }
    agg.tick();
    if progress {
        eprint!("\r{:79}\r", "");
    }
    let netns_filter = filter.netns.clone();
    session.gather(&request(&agg, &netns_filter, true));
    if let Some(line) = session.host.tell_once() {
        eprintln!("twtrace: {line}");
    }
    let ctx = context(&session, &agg, &netns_filter, started);
    let mut names = CgroupNames::new();
    let (by, sort, top) = (args.group.by, args.group.sort, args.top);
    let mut unit = |id| names.unit(id);
    let text = if args.json {
        format!("{}\n", report::json(&agg, by, sort, top, &ctx, &mut unit))
    } else {
        report::table(&agg, by, sort, top, &ctx, &mut unit)
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    session.write_stats(args.probe.stats_json.as_deref())?;
    if ctx.loss.total() > 0 {
        eprintln!("twtrace: {}", session::loss_line(&ctx.loss));
    }
    Ok(())
}
