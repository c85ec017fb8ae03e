//! `twtrace report`: collect for a while, then print who made the TIME_WAIT.

use std::{
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use crate::{
    cli::ReportArgs,
    host::clock,
    host::{cgroup::CgroupNames, collect::Request, netns},
    output,
    present::report::{self, Context, NsContext},
    say, say_raw,
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
        lookups: Vec::new(),
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

/// Where reports go: standard output, or `--output FILE` (opened before the run).
enum Sink {
    Stdout,
    File(std::fs::File),
}

impl Sink {
    /// Writes one report; Ok(false) when standard output's reader has left (stop quietly).
    fn write(&mut self, text: &str) -> Result<bool, crate::failure::Failure> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                    Ok(()) => Ok(true),
                    Err(e) => match output::stdout_failure(&e) {
                        None => Ok(false),
                        Some(f) => Err(f),
                    },
                }
            }
            Sink::File(f) => f
                .write_all(text.as_bytes())
                .and_then(|()| f.flush())
                .map(|()| true)
                .map_err(|e| {
                    crate::failure::Failure::new(
                        crate::failure::Code::Error,
                        format!("cannot write --output: {e}"),
                    )
                }),
        }
    }
}

pub async fn run(args: ReportArgs) -> anyhow::Result<()> {
    let filter = args.filter.to_filter();
    // Output files first: a path that cannot be written is found before anything is attached.
    let stats_file = output::create_opt("--stats-json", args.probe.stats_json.as_ref())?;
    let mut sink = match &args.output {
        Some(path) => Sink::File(output::create("--output", path)?),
        None => Sink::Stdout,
    };
    // With --interval the run lasts until stopped (or --duration); without, 30 s by default.
    let duration = match (args.duration, args.interval) {
        (Some(d), _) => Some(d),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(30)),
    };
    // The handlers first: a signal from now on (while attaching too) ends the run cleanly.
    let stop = session::stop_signal(duration)?;
    tokio::pin!(stop);
    let mut session = Session::start(args.probe.options(), true)?;
    let new_agg = |session: &Session| {
        let mut agg = Aggregator::new(args.group.max_groups);
        agg.set_listening_ports(session.listening.clone());
        agg
    };
    let mut agg = new_agg(&session);
    let mut started = Instant::now();
    match (duration, args.interval) {
        (Some(d), None) => say!("collecting for {}s; Ctrl-C to stop early", d.as_secs_f64()),
        (_, Some(i)) => say!(
            "collecting, a report every {}s; Ctrl-C to stop",
            i.as_secs_f64()
        ),
        (None, None) => unreachable!("a duration or an interval"),
    }
    let progress = args.interval.is_none() && std::io::stderr().is_terminal();
    let mut interval = args.interval.map(|i| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + i, i);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let mut last_tick = Instant::now();
    let netns_filter = filter.netns.clone();
    let mut names = CgroupNames::new();
    let mut render = |session: &mut Session, agg: &mut Aggregator, started: Instant| {
        agg.tick();
        session.gather(&request(agg, &netns_filter, true));
        if let Some(line) = session.host.tell_once() {
            say!("{line}");
        }
        let ctx = context(session, agg, &netns_filter, started);
        let (by, sort, top) = (args.group.by, args.group.sort, args.top);
        let mut unit = |id| names.unit(id);
        let text = if args.json {
            format!("{}\n", report::json(agg, by, sort, top, &ctx, &mut unit))
        } else {
            report::table(agg, by, sort, top, &ctx, &mut unit)
        };
        (text, ctx.loss)
    };
    let mut reports = 0u64;
    loop {
        let tick = async {
            match interval.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let events = tokio::select! {
            r = &mut stop => { r?; break; }
            () = tick => {
                // One interval's report, then a fresh aggregate that starts from the TIME_WAIT
                // alive now (counted in "now", not as births).
                let (text, _) = render(&mut session, &mut agg, started);
                let separator = if reports > 0 && !args.json { "\n" } else { "" };
                reports += 1;
                if !sink.write(&format!("{separator}{text}"))? {
                    return finish(&session, stats_file, None);
                }
                agg = new_agg(&session);
                for e in session.alive() {
                    if filter.matches_enter(&e) {
                        agg.adopt(&e);
                    }
                }
                started = Instant::now();
                continue;
            }
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
                say_raw!(
                    "\rtwtrace: collecting {:>4.0}/{}s: {} births, {} in TIME_WAIT ",
                    started.elapsed().as_secs_f64(),
                    duration.map_or(0, |d| d.as_secs()),
                    t.entered,
                    t.in_time_wait
                );
            }
        }
    }
    for ev in session.finish().iter().filter(|e| filter.matches(e)) {
        agg.on_event(ev);
    }
    if progress {
        say_raw!("\r{:79}\r", "");
    }
    let (text, loss) = render(&mut session, &mut agg, started);
    let separator = if reports > 0 && !args.json { "\n" } else { "" };
    sink.write(&format!("{separator}{text}"))?;
    finish(&session, stats_file, Some(loss))
}

/// The end of a report run: the stats file, and the loss when there was any.
fn finish(
    session: &Session,
    stats_file: Option<std::fs::File>,
    loss: Option<crate::track::session::Loss>,
) -> anyhow::Result<()> {
    session.write_stats(stats_file)?;
    let loss = loss.unwrap_or_else(|| session.loss());
    if loss.total() > 0 {
        say!("{}", session::loss_line(&loss));
    }
    Ok(())
}
