//! `twtrace serve`: a daemon. Prometheus metrics on `GET /metrics`, the report's JSON on
//! `GET /api/v1/report` (its defaults from `--by` and `--sort`), `GET /healthz`, and on `GET /`
//! a small page linking them; anything else 404 (or 405 for another method). Answers are
//! gzipped when the client asks for it. It binds its socket (a busy port: exit 8, before
//! anything is attached), attaches as root, starts its collector process (which keeps only
//! what reading every network namespace needs: see `host::collect`), then drops to an
//! unprivileged user with no capabilities and keeps only its open descriptors. SIGTERM, SIGINT
//! or SIGHUP ends it with exit code 0. Logs on stderr follow `--log-level`: one line per failed
//! request or error, never one per request unless `debug`.
//!
//! A report request with filters gets a view of its own: an aggregate that adopts the TIME_WAIT
//! sockets alive at that moment (so "now" is right at once) and counts births from then on,
//! kept while it is asked for (at most `MAX_VIEWS`, least recently used dropped).

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{DefaultBodyLimit, RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};

use crate::{
    cli::{LogLevel, ServeArgs},
    failure::{Code, Failure},
    host::cgroup::CgroupNames,
    host::collect::{self, Reply, Request},
    host::privileges,
    output,
    present::api,
    present::cost,
    present::metrics::{self, BuildInfo, Exporter},
    present::report::{self, Context, Sort},
    track::aggregate::{Aggregator, By},
    track::filter::Filter,
    track::lifecycle::Event,
    track::session::{self, OwnCost, Session},
    views::report::{context, request},
};

/// Filtered report views kept at once.
pub const MAX_VIEWS: usize = 16;

struct View {
    filter: Filter,
    agg: Aggregator,
    started: Instant,
    last_used: Instant,
}

struct ServeState {
    /// Everything that passes serve's own filters, since start.
    main: View,
    views: Vec<View>,
    exporter: Exporter,
    ctx: Context,
    info: BuildInfo,
    max_groups: usize,
    units: CgroupNames,
    /// What tracing costs, refreshed once a second (`present::cost`).
    cost: OwnCost,
}

impl ServeState {
    fn feed(&mut self, events: &[Event]) {
        for ev in events.iter().filter(|e| self.main.filter.matches(e)) {
            self.main.agg.on_event(ev);
            for v in &mut self.views {
                if v.filter.matches(ev) {
                    v.agg.on_event(ev);
                }
            }
        }
    }
}

type Shared = Arc<Mutex<ServeState>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, ServeState> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct MetricsSource(Shared);

impl std::fmt::Debug for ServeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServeState")
    }
}

impl Collector for MetricsSource {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let mut guard = lock(&self.0);
        let s = &mut *guard;
        metrics::encode(&mut enc, &mut s.exporter, &mut s.main.agg, &s.ctx, &s.info)?;
        cost::encode(&mut enc, &s.cost)
    }
}

#[derive(Clone)]
struct App {
    shared: Shared,
    registry: Arc<Registry>,
    /// New filtered views are made by the main loop, which owns the session.
    new_view: mpsc::Sender<(Filter, oneshot::Sender<()>)>,
    /// `--by` and `--sort`: the API's defaults.
    by: By,
    sort: Sort,
    log: LogLevel,
}

/// A line on stderr when `level` is within `--log-level`.
fn log(limit: LogLevel, level: LogLevel, line: std::fmt::Arguments) {
    // `twtrace: serving on ...` like every view's own lines (scripts wait for them); what is
    // not news says its level: `twtrace: warning: ...`.
    if level <= limit {
        if level == LogLevel::Info {
            crate::say!("{line}");
        } else {
            crate::say!("{}: {line}", level.as_str());
        }
    }
}

/// The page on `GET /`: what this is and where the figures are, as exporters do.
const INDEX: &str = "<!DOCTYPE html>
<html><head><meta charset=\"utf-8\"><title>twtrace</title></head>
<body>
<h1>twtrace</h1>
<p>Where this host's TCP TIME_WAIT sockets come from.</p>
<ul>
<li><a href=\"metrics\">metrics</a> (Prometheus)</li>
<li><a href=\"api/v1/report\">api/v1/report</a> (JSON; by, sort, top, port, peer, pid, comm,
family, netns)</li>
<li><a href=\"healthz\">healthz</a></li>
</ul>
</body></html>
";

async fn metrics_handler(State(app): State<App>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut out, &app.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn error(code: StatusCode, message: String) -> Response {
    (code, Json(json!({ "error": message }))).into_response()
}

async fn report_handler(State(app): State<App>, RawQuery(query): RawQuery) -> Response {
    let defaults = api::ReportQuery {
        by: app.by,
        sort: app.sort,
        ..api::ReportQuery::default()
    };
    let q = match api::parse(query.as_deref(), defaults) {
        Ok(q) => q,
        Err(e) => {
            log(
                app.log,
                LogLevel::Warn,
                format_args!("GET /api/v1/report refused (400): {e}"),
            );
            return error(StatusCode::BAD_REQUEST, e);
        }
    };
    let main = q.filter == Filter::default();
    if !main && !lock(&app.shared).views.iter().any(|v| v.filter == q.filter) {
        let (tx, rx) = oneshot::channel();
        if app.new_view.send((q.filter.clone(), tx)).await.is_err()
            || tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .is_err()
        {
            return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down".into());
        }
    }
    let mut guard = lock(&app.shared);
    let s = &mut *guard;
    let view = if main {
        &mut s.main
    } else {
        match s.views.iter_mut().find(|v| v.filter == q.filter) {
            Some(v) => v,
            None => return error(StatusCode::SERVICE_UNAVAILABLE, "view dropped".into()),
        }
    };
    view.last_used = Instant::now();
    let ctx = Context {
        duration_s: view.started.elapsed().as_secs_f64(),
        ..s.ctx.clone()
    };
    let units = &mut s.units;
    Json(report::json(
        &view.agg,
        q.by,
        q.sort,
        q.top,
        &ctx,
        &mut |id| units.unit(id),
    ))
    .into_response()
}

/// Logs each request by its outcome: failed ones (5xx) at warn (a refused report query is
/// logged by its handler, with the reason), every one at debug.
async fn access_log(
    State(level): State<LogLevel>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let response = next.run(req).await;
    let status = response.status();
    if status.is_server_error() {
        log(
            level,
            LogLevel::Warn,
            format_args!("{method} {uri} failed ({status})"),
        );
    } else if status == StatusCode::BAD_REQUEST && uri.path() == "/api/v1/report" {
        // Logged by the handler, with the reason.
    } else {
        log(
            level,
            LogLevel::Debug,
            format_args!("{method} {uri} {}", status.as_u16()),
        );
    }
    response
}

fn router(
    shared: Shared,
    new_view: mpsc::Sender<(Filter, oneshot::Sender<()>)>,
    args: &ServeArgs,
) -> Router {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(MetricsSource(shared.clone())));
    let app = App {
        shared,
        registry: Arc::new(registry),
        new_view,
        by: args.group.by,
        sort: args.group.sort,
        log: args.log_level,
    };
    Router::new()
        .route(
            "/",
            get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX) }),
        )
        .route("/metrics", get(metrics_handler))
        .route("/api/v1/report", get(report_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        // GET only: no request needs a body.
        .layer(DefaultBodyLimit::max(0))
        .layer(tower_http::compression::CompressionLayer::new().gzip(true))
        .layer(axum::middleware::from_fn_with_state(
            args.log_level,
            access_log,
        ))
        .with_state(app)
}

/// The listening socket. `[::]:PORT` (`--listen :PORT`) is one socket for IPv6 and IPv4
/// alike (IPV6_V6ONLY off), or `0.0.0.0:PORT` where the host has no IPv6. A port in use is
/// not bad usage: exit 8 (`Code::Listen`), which a supervisor restarts.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, Failure> {
    use socket2::{Domain, Protocol, Socket, Type};
    let open = |addr: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if addr.is_ipv6() && addr.ip().is_unspecified() {
            socket.set_only_v6(false)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.set_cloexec(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    };
    let any_v6 = addr.is_ipv6() && addr.ip().is_unspecified();
    let r = match open(addr) {
        Err(e) if any_v6 && e.raw_os_error() == Some(libc::EAFNOSUPPORT) => open(SocketAddr::new(
            std::net::Ipv4Addr::UNSPECIFIED.into(),
            addr.port(),
        )),
        r => r,
    };
    r.map_err(|e| {
        let shown = if any_v6 {
            format!(":{}", addr.port())
        } else {
            addr.to_string()
        };
        Failure::new(Code::Listen, format!("cannot listen on {shown}: {e}"))
    })
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let filter = args.filter.to_filter();
    let account = privileges::lookup(&args.user)?;
    // Before attaching: a busy port or a file that cannot be written is found at once (and the
    // file stays writable after the drop to --user).
    let stats_file = output::create_opt("--stats-json", args.probe.stats_json.as_ref())?;
    let listener = tokio::net::TcpListener::from_std(bind(args.listen)?)?;
    // The handlers first: a signal from now on (while attaching too) ends the run cleanly.
    let stop = session::stop_signal(None)?;
    let mut session = Session::start(args.probe.options(), true)?;
    // Started while this process still holds its privileges; it keeps only the three it needs.
    let collector = collect::Client::spawn(session.probes.counters_fd()).map_err(|e| {
        Failure::new(
            Code::Error,
            format!("cannot start the collector process ({e})"),
        )
    })?;
    session.collector = None;
    cost::prepare();
    privileges::drop_to(account)?;
    serve(args, filter, session, listener, collector, stats_file, stop).await
}

/// Runs the collector's requests one at a time, beside the main loop (which must keep reading
/// the ring buffer while a scan of many namespaces takes its time).
fn collector_task(
    mut client: collect::Client,
) -> (
    mpsc::Sender<Request>,
    mpsc::Receiver<std::io::Result<Reply>>,
) {
    let (req_tx, mut req_rx) = mpsc::channel::<Request>(1);
    let (rep_tx, rep_rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while let Some(req) = req_rx.recv().await {
            if rep_tx.send(client.ask(&req).await).await.is_err() {
                break;
            }
        }
    });
    (req_tx, rep_rx)
}

async fn serve(
    args: ServeArgs,
    filter: Filter,
    mut session: Session,
    listener: tokio::net::TcpListener,
    collector: collect::Client,
    stats_file: Option<std::fs::File>,
    stop: impl std::future::Future<Output = std::io::Result<()>>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let level = args.log_level;
    let netns_filter = filter.netns.clone();
    let mut main = Aggregator::new(args.group.max_groups);
    main.set_listening_ports(session.listening.clone());
    // Every outgoing destination's ports, per source: twtrace_peer_port_usage_ratio.
    main.track_ports();
    if let Some(line) = session.host.tell_once() {
        log(level, LogLevel::Warn, format_args!("{line}"));
    }
    let ctx = context(&session, &main, &netns_filter, started);
    let shared: Shared = Arc::new(Mutex::new(ServeState {
        main: View {
            filter,
            agg: main,
            started,
            last_used: started,
        },
        views: Vec::new(),
        exporter: Exporter::new(args.max_series),
        ctx,
        info: BuildInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            kernel: session.probes.info.release.clone(),
        },
        max_groups: args.group.max_groups,
        units: CgroupNames::new(),
        cost: session.own_cost(),
    }));
    let (ask, mut replies) = collector_task(collector);
    let mut asked = false;
    let mut collector_failed = false;
    let mut counters_unreadable_told = false;
    let (view_tx, mut view_rx) = mpsc::channel(8);
    let (quit_tx, quit_rx) = oneshot::channel::<()>();
    let app = router(shared.clone(), view_tx, &args);
    let local: SocketAddr = listener.local_addr()?;
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = quit_rx.await;
            })
            .await
    });
    log(
        level,
        LogLevel::Info,
        format_args!("serving on http://{local} (metrics, /api/v1/report, /healthz)"),
    );

    tokio::pin!(stop);
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut last_close_wait = Instant::now();
    loop {
        tokio::select! {
            r = &mut stop => { r?; break; }
            Some((view_filter, reply)) = view_rx.recv() => {
                let mut s = lock(&shared);
                if !s.views.iter().any(|v| v.filter == view_filter) {
                    let mut agg = Aggregator::new(s.max_groups);
                    agg.set_listening_ports(session.listening.clone());
                    for e in session.alive() {
                        if s.main.filter.matches_enter(&e) && view_filter.matches_enter(&e) {
                            agg.adopt(&e);
                        }
                    }
                    if s.views.len() >= MAX_VIEWS
                        && let Some(oldest) = s
                            .views
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, v)| v.last_used)
                            .map(|(i, _)| i)
                    {
                        s.views.swap_remove(oldest);
                    }
                    let now = Instant::now();
                    s.views.push(View { filter: view_filter, agg, started: now, last_used: now });
                }
                let _ = reply.send(());
            }
            r = session.next() => {
                let events = r?;
                lock(&shared).feed(events);
            }
            Some(reply) = replies.recv() => {
                asked = false;
                match reply {
                    Ok(mut reply) => {
                        match reply.counters.take() {
                            Some(c) => session.relayed_counters = Some(c),
                            None if !counters_unreadable_told
                                && session.probes.try_counters().is_err() =>
                            {
                                counters_unreadable_told = true;
                                log(
                                    level,
                                    LogLevel::Warn,
                                    format_args!(
                                        "the kernel programs' counters (lost events among them) \
                                         cannot be read after the drop to --user on this kernel \
                                         (before 5.19), nor by the collector process (it needs \
                                         CAP_SYS_ADMIN): twtrace_events_lost_total stays 0"
                                    ),
                                );
                            }
                            None => {}
                        }
                        session.apply(reply);
                        if let Some(line) = session.host.tell_once() {
                            log(level, LogLevel::Warn, format_args!("{line}"));
                        }
                        let mut s = lock(&shared);
                        let s = &mut *s;
                        let seen: Vec<(u32, u64)> = s.main.agg.namespaces().collect();
                        for netns in session.host.gone(seen.into_iter()) {
                            s.main.agg.forget_netns(netns);
                            s.exporter.forget_netns(netns);
                            for v in &mut s.views {
                                v.agg.forget_netns(netns);
                            }
                        }
                        s.ctx = context(&session, &s.main.agg, &netns_filter, started);
                    }
                    Err(e) if !collector_failed => {
                        collector_failed = true;
                        log(
                            level,
                            LogLevel::Error,
                            format_args!(
                                "the collector stopped answering ({e}): the kernel's \
                                 per-namespace figures and CLOSE_WAIT are no longer updated"
                            ),
                        );
                    }
                    Err(_) => {}
                }
            }
            _ = second.tick() => {
                let mut s = lock(&shared);
                s.main.agg.tick();
                for v in &mut s.views {
                    v.agg.tick();
                }
                // Figures once a second; CLOSE_WAIT (a walk of /proc and of each namespace's
                // connection table) every 5 s. One request at a time.
                if !asked && !collector_failed {
                    let scan = last_close_wait.elapsed() >= Duration::from_secs(5);
                    if scan {
                        last_close_wait = Instant::now();
                    }
                    let mut req = request(&s.main.agg, &netns_filter, scan);
                    req.lookups = session.lookups();
                    asked = ask.try_send(req).is_ok();
                }
                let ctx = context(&session, &s.main.agg, &netns_filter, started);
                s.ctx = ctx;
                s.cost = session.own_cost();
            }
        }
    }
    let _ = quit_tx.send(());
    let _ = tokio::time::timeout(Duration::from_millis(500), server).await;
    session.write_stats(stats_file)?;
    log(
        level,
        LogLevel::Info,
        format_args!("{}", session::loss_line(&session.loss())),
    );
    Ok(())
}
