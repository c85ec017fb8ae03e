//! `twtrace report`: collect for a while, then print who made the TIME_WAIT.

use std::{
    io::{IsTerminal, Write},
    time::{Duration, Instant},
};

use crate::{
    cli::ReportArgs,
    host,
    host::cgroup::CgroupNames,
    host::clock,
    present::report::{self, Context},
    track::aggregate::Aggregator,
    track::session::{self, Session},
};

/// Everything a report needs besides the aggregate, read now. The CLOSE_WAIT owners walk
/// /proc, so a caller refreshing often can leave them out.
pub fn context(session: &Session, started: Instant, close_wait: bool) -> Context {
    Context {
        duration_s: started.elapsed().as_secs_f64(),
        now_sec: clock::monotonic_ns() / 1_000_000_000,
        loss: session.loss(),
        skipped_overflow: host::counters::tw_counters()
            .since(&session.counters_at_start)
            .overflow,
        kernel_time_wait: host::counters::sockstat_tw(),
        ephemeral_ports: host::settings::settings().ephemeral_ports(),
        close_wait: if close_wait {
            host::close_wait::close_wait_by_process()
        } else {
            Vec::new()
        },
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
    let ctx = context(&session, started, true);
    let mut names = CgroupNames::new();
    let (by, sort, top) = (args.group.by, args.group.sort, args.top);
    let mut unit = |id| names.label(id);
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
