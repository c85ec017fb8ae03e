//! A connection churn generator for the benchmark: as many short TCP connections per second as
//! this machine makes, on loopback, bounded in count and in time.
//!
//! ```text
//! twt-loadgen [--seconds S] [--max-connections N] [--threads N] [--server-threads N]
//!             [--ports N] [--sources N] [--closer client|server] [--refused] [-6]
//! ```
//!
//! * `--seconds S`: stop after S seconds (default 5, at most 120).
//! * `--max-connections N`: stop after N connections (default and maximum 50,000,000).
//! * `--threads N`: client threads, and as many server threads unless `--server-threads` says
//!   otherwise (default 2 each, at most 64).
//! * `--ports N`: listeners on N ports of 127.0.0.1 (or ::1 with `-6`), default 8 (32 with `-6`:
//!   IPv6 loopback has one address, so the ports are all the room there is).
//! * `--sources N`: IPv4 source addresses used in rotation, 127.0.x.y from 127.0.1.1 on
//!   (default 256). Each client socket binds one with `IP_BIND_ADDRESS_NO_PORT`, so the kernel
//!   picks the port at connect() time for the whole 4-tuple: sources x ports x ephemeral ports
//!   4-tuples, never EADDRNOTAVAIL at this rate.
//! * `--closer client` (default): the client closes first and keeps the TIME_WAIT, one per
//!   connection. `--closer server`: the server closes first and keeps it.
//! * `--refused`: every connect() is refused instead (the ports are bound, never listened on:
//!   the kernel answers the SYN with a reset), for the cost of failed connects; no server
//!   threads, no TIME_WAIT. `connections` then counts the refused connects.
//!
//! Each connection exchanges one byte each way: plain blocking sockets, TCP_NODELAY on,
//! SO_LINGER not set. Every server thread owns one SO_REUSEPORT listener per port, polls them,
//! accepts, answers at once and, with `--closer client`, queues the connection until the
//! client's FIN has arrived (closing it oldest first), so that waiting for a FIN never holds up
//! an accept.
//!
//! At the end it prints one JSON line: connections made, seconds, connections/s, errors (and
//! the first error's text), what the server side accepted, and the settings. Exit code 0 when it
//! ran (errors are counted, not fatal), 2 on bad usage, 1 when it could not start.

use std::{
    collections::VecDeque,
    io::{Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    process::ExitCode,
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};
use twtrace_tests::sock::sockaddr;

const MAX_SECONDS: f64 = 120.0;
const MAX_CONNECTIONS: u64 = 50_000_000;
const MAX_THREADS: usize = 64;
const MAX_PORTS: usize = 1024;
const MAX_SOURCES: usize = 65_024;
/// Give up when this many attempts failed (something is wrong, not just busy).
const MAX_ERRORS: u64 = 100_000;
/// Server-side reads give up after this long (a client thread that died cannot hang a server).
const SERVER_READ_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq)]
enum Closer {
    Client,
    Server,
}

#[derive(Debug)]
struct Opts {
    seconds: f64,
    max_connections: u64,
    threads: usize,
    server_threads: usize,
    ports: usize,
    sources: usize,
    closer: Closer,
    refused: bool,
    v6: bool,
}

const USAGE: &str = "usage: twt-loadgen [--seconds S (<= 120)] [--max-connections N] \
[--threads N] [--server-threads N] [--ports N] [--sources N] [--closer client|server] \
[--refused] [-6]";

/// A number from `lo` to `hi`, or an error naming the option.
fn num<T>(name: &str, v: &str, lo: T, hi: T) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy,
{
    match v.parse::<T>() {
        Ok(n) if n >= lo && n <= hi => Ok(n),
        _ => Err(format!("{name}: '{v}' is not a number from {lo} to {hi}")),
    }
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        seconds: 5.0,
        max_connections: MAX_CONNECTIONS,
        threads: 2,
        server_threads: 0,
        ports: 0,
        sources: 256,
        closer: Closer::Client,
        refused: false,
        v6: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--seconds" => o.seconds = num("--seconds", &val()?, 0.1, MAX_SECONDS)?,
            "--max-connections" => {
                o.max_connections = num("--max-connections", &val()?, 1, MAX_CONNECTIONS)?
            }
            "--threads" => o.threads = num("--threads", &val()?, 1, MAX_THREADS)?,
            "--server-threads" => {
                o.server_threads = num("--server-threads", &val()?, 1, MAX_THREADS)?
            }
            "--ports" => o.ports = num("--ports", &val()?, 1, MAX_PORTS)?,
            "--sources" => o.sources = num("--sources", &val()?, 1, MAX_SOURCES)?,
            "--closer" => {
                o.closer = match val()?.as_str() {
                    "client" => Closer::Client,
                    "server" => Closer::Server,
                    other => return Err(format!("--closer: '{other}' is not client or server")),
                }
            }
            "--refused" => o.refused = true,
            "-6" | "--ipv6" => o.v6 = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.refused {
        o.server_threads = 0;
    } else if o.server_threads == 0 {
        o.server_threads = o.threads;
    }
    if o.ports == 0 {
        o.ports = if o.v6 { 32 } else { 8 };
    }
    Ok(o)
}

fn last_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn check(r: libc::c_int) -> std::io::Result<libc::c_int> {
    if r < 0 { Err(last_error()) } else { Ok(r) }
}

fn set_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: a valid int option value and its length.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn socket(v6: bool, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2).
    let fd =
        check(unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC | flags, 0) })?;
    // SAFETY: fd is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: RawFd, addr: &SocketAddr) -> std::io::Result<()> {
    let (ss, len) = sockaddr(addr);
    // SAFETY: ss holds a valid address of len bytes.
    check(unsafe { libc::bind(fd, (&raw const ss).cast(), len) }).map(drop)
}

/// One listener of a server thread: SO_REUSEPORT so that every server thread has its own
/// socket on every port; non-blocking (accepted sockets are blocking); the read timeout and
/// TCP_NODELAY are inherited by the accepted sockets.
fn listener(addr: &SocketAddr) -> std::io::Result<OwnedFd> {
    let fd = socket(addr.is_ipv6(), libc::SOCK_NONBLOCK)?;
    let raw = fd.as_raw_fd();
    set_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    set_int(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    set_int(raw, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    let tv = libc::timeval {
        tv_sec: SERVER_READ_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: a valid timeval and its length.
    check(unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    bind(raw, addr)?;
    // SAFETY: listen(2) on our socket.
    check(unsafe { libc::listen(raw, 4096) })?;
    Ok(fd)
}

fn local_port(fd: RawFd) -> std::io::Result<u16> {
    // SAFETY: getsockname fills at most len bytes of ss.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    check(unsafe { libc::getsockname(fd, (&raw mut ss).cast(), &mut len) })?;
    let port = if ss.ss_family == libc::AF_INET as libc::sa_family_t {
        // SAFETY: the kernel wrote a sockaddr_in.
        unsafe { (*(&raw const ss).cast::<libc::sockaddr_in>()).sin_port }
    } else {
        // SAFETY: the kernel wrote a sockaddr_in6.
        unsafe { (*(&raw const ss).cast::<libc::sockaddr_in6>()).sin6_port }
    };
    Ok(u16::from_be(port))
}

/// What one thread did.
#[derive(Default)]
struct Tally {
    made: u64,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn error(&mut self, what: &str, e: std::io::Error) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(format!("{what}: {e}"));
        }
    }
}

/// One connection from `src` (IPv4 only: bound without a port) to `dst`, one byte each way;
/// with `refused`, one connect() that the kernel refuses (`dst` is bound, not listening).
fn connection(
    src: Option<&SocketAddr>,
    dst: &SocketAddr,
    closer: Closer,
    refused: bool,
) -> Result<(), (&'static str, std::io::Error)> {
    let fd = socket(dst.is_ipv6(), 0).map_err(|e| ("socket", e))?;
    let raw = fd.as_raw_fd();
    set_int(raw, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1).map_err(|e| ("TCP_NODELAY", e))?;
    if let Some(src) = src {
        set_int(raw, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)
            .map_err(|e| ("IP_BIND_ADDRESS_NO_PORT", e))?;
        bind(raw, src).map_err(|e| ("bind", e))?;
    }
    let (ss, len) = sockaddr(dst);
    // SAFETY: ss holds a valid address of len bytes.
    let rc = check(unsafe { libc::connect(raw, (&raw const ss).cast(), len) });
    if refused {
        return match rc {
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(()),
            Err(e) => Err(("connect", e)),
            Ok(_) => Err(("connect", std::io::Error::other("connected: not refused"))),
        };
    }
    rc.map_err(|e| ("connect", e))?;
    let mut s = TcpStream::from(fd);
    s.write_all(b"x").map_err(|e| ("write", e))?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).map_err(|e| ("read", e))?;
    if closer == Closer::Server {
        // The server closes first: wait for its FIN, then close (LAST_ACK here).
        let n = s.read(&mut b).map_err(|e| ("read", e))?;
        if n != 0 {
            return Err((
                "read",
                std::io::Error::other("server sent more than one byte"),
            ));
        }
    }
    Ok(())
    // drop: close(); with --closer client this side goes FIN_WAIT1 and keeps the TIME_WAIT.
}

/// What every client thread shares.
struct Shared {
    opts: Opts,
    /// IPv4 source addresses (empty with -6: IPv6 clients connect from ::1 without binding).
    sources: Vec<SocketAddr>,
    dsts: Vec<SocketAddr>,
    start: Barrier,
    stop: AtomicBool,
    run_for: Duration,
}

fn client(id: usize, sh: &Shared, budget: u64) -> Tally {
    let (sources, dsts, stop) = (&sh.sources, &sh.dsts, &sh.stop);
    let mut t = Tally::default();
    sh.start.wait();
    let deadline = Instant::now() + sh.run_for;
    // Each thread starts elsewhere in the rotation.
    let mut i: usize = id.wrapping_mul(7919);
    let mut failed_in_a_row = 0u32;
    while t.made < budget && !stop.load(Ordering::Relaxed) {
        if (i & 31) == 0 && Instant::now() >= deadline {
            break;
        }
        let src = if sources.is_empty() {
            None
        } else {
            Some(&sources[i % sources.len()])
        };
        // Every (source, destination) pair comes round: the port index moves once per lap
        // of the sources.
        let dst = &dsts[(i / sources.len().max(1)) % dsts.len()];
        i = i.wrapping_add(1);
        match connection(src, dst, sh.opts.closer, sh.opts.refused) {
            Ok(()) => {
                t.made += 1;
                failed_in_a_row = 0;
            }
            Err((what, e)) => {
                t.error(what, e);
                failed_in_a_row += 1;
                if t.errors >= MAX_ERRORS {
                    stop.store(true, Ordering::Relaxed);
                    break;
                }
                if failed_in_a_row >= 100 {
                    // Out of something (ports, memory): do not spin.
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    if Instant::now() >= deadline + Duration::from_secs(1) {
        // A connection outlived the deadline by a second: say so rather than report a rate
        // that includes it silently.
        t.error(
            "deadline",
            std::io::Error::other("the last connection ended late"),
        );
    }
    t
}

/// Reads one byte (or the end of the stream) from an accepted socket; `wait` false: do not
/// block (`None` when nothing has arrived yet).
fn read_one(s: &TcpStream, wait: bool) -> std::io::Result<Option<usize>> {
    let mut b = [0u8; 1];
    let flags = if wait { 0 } else { libc::MSG_DONTWAIT };
    loop {
        // SAFETY: recv into a 1-byte buffer we own.
        let n = unsafe { libc::recv(s.as_raw_fd(), b.as_mut_ptr().cast(), 1, flags) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = last_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) if !wait => return Ok(None),
            Some(libc::EAGAIN) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no data within the read timeout",
                ));
            }
            _ => return Err(e),
        }
    }
}

/// At most this many served connections wait for their client's FIN per server thread.
const MAX_PENDING: usize = 256;

/// A server thread: accepts from its listeners (one per port), answers each request at once,
/// and closes each connection when the client's FIN has arrived (client closes first) or right
/// after the answer (server closes first). Waiting for a FIN never holds up an accept: served
/// connections wait in a queue and are closed, oldest first, as their FINs arrive.
fn server(listeners: Vec<OwnedFd>, closer: Closer, start: &Barrier, stop: &AtomicBool) -> Tally {
    let mut t = Tally::default();
    let mut pfds: Vec<libc::pollfd> = listeners
        .iter()
        .map(|l| libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut pending: VecDeque<TcpStream> = VecDeque::new();
    let finish = |t: &mut Tally, s: TcpStream, wait: bool| -> Option<TcpStream> {
        match read_one(&s, wait) {
            Ok(None) => Some(s),
            Ok(Some(0)) => {
                t.made += 1;
                None
            }
            Ok(Some(_)) => {
                t.error(
                    "server read",
                    std::io::Error::other("client sent more than one byte"),
                );
                None
            }
            Err(e) => {
                t.error("server read", e);
                None
            }
        }
    };
    start.wait();
    loop {
        // Close what the clients have finished with, without waiting.
        while let Some(s) = pending.pop_front() {
            if let Some(s) = finish(&mut t, s, false) {
                pending.push_front(s);
                break;
            }
        }
        if pending.len() >= MAX_PENDING {
            let s = pending.pop_front().expect("not empty");
            finish(&mut t, s, true);
            continue;
        }
        let timeout = if pending.is_empty() { 50 } else { 0 };
        // SAFETY: pfds is a valid array of pollfd.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        if r < 0 {
            let e = last_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                t.error("poll", e);
                thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        if r == 0 {
            if let Some(s) = pending.pop_front() {
                // Nothing to accept: wait for the oldest client's FIN (it is on its way).
                finish(&mut t, s, true);
            } else if stop.load(Ordering::Relaxed) {
                return t;
            }
            continue;
        }
        for p in pfds.iter().filter(|p| p.revents != 0) {
            // SAFETY: accept4 on our listener; no address wanted.
            let fd = unsafe {
                libc::accept4(
                    p.fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = last_error();
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::EAGAIN | libc::EINTR | libc::ECONNABORTED)
                ) {
                    t.error("accept", e);
                }
                continue;
            }
            // SAFETY: fd is a new descriptor that nothing else owns.
            let mut s = TcpStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
            let mut b = [0u8; 1];
            if let Err(e) = s.read_exact(&mut b) {
                t.error("server read", e);
                continue;
            }
            if let Err(e) = s.write_all(&b) {
                t.error("server write", e);
                continue;
            }
            match closer {
                // Closing first, with the request answered: TIME_WAIT stays here.
                Closer::Server => t.made += 1,
                Closer::Client => pending.push_back(s),
            }
        }
    }
}

fn run(o: Opts) -> Result<(), String> {
    let ip = if o.v6 {
        std::net::IpAddr::V6(Ipv6Addr::LOCALHOST)
    } else {
        std::net::IpAddr::V4(Ipv4Addr::LOCALHOST)
    };
    // Listeners: one per (server thread, port), all threads sharing each port.
    let mut per_thread: Vec<Vec<OwnedFd>> = (0..o.server_threads).map(|_| Vec::new()).collect();
    let mut dsts = Vec::with_capacity(o.ports);
    // --refused: ports bound and never listened on, held until the end (nobody else gets them).
    let mut closed_ports = Vec::new();
    for _ in 0..o.ports {
        if o.refused {
            let fd = socket(o.v6, 0).map_err(|e| format!("socket: {e}"))?;
            bind(fd.as_raw_fd(), &SocketAddr::new(ip, 0)).map_err(|e| format!("bind {ip}: {e}"))?;
            let port = local_port(fd.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
            dsts.push(SocketAddr::new(ip, port));
            closed_ports.push(fd);
            continue;
        }
        let first =
            listener(&SocketAddr::new(ip, 0)).map_err(|e| format!("listen on {ip}: {e}"))?;
        let port = local_port(first.as_raw_fd()).map_err(|e| format!("getsockname: {e}"))?;
        let addr = SocketAddr::new(ip, port);
        per_thread[0].push(first);
        for l in per_thread.iter_mut().skip(1) {
            l.push(listener(&addr).map_err(|e| format!("listen on {addr}: {e}"))?);
        }
        dsts.push(addr);
    }
    let sources: Vec<SocketAddr> = if o.v6 {
        Vec::new()
    } else {
        (0..o.sources)
            .map(|n| {
                // 127.0.1.1, 127.0.1.2, ... 127.0.1.254, 127.0.2.1, ...: never .0 or .255.
                let x = 1 + n / 254;
                let y = 1 + n % 254;
                SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::new(127, 0, x as u8, y as u8),
                    0,
                ))
            })
            .collect()
    };

    let run_for = Duration::from_secs_f64(o.seconds);
    // A hard bound whatever happens: the whole run, plus time to finish, plus a margin.
    let hard = run_for + Duration::from_secs(15);
    thread::spawn(move || {
        thread::sleep(hard);
        eprintln!(
            "twt-loadgen: still running {}s after the start: giving up",
            hard.as_secs()
        );
        println!("{{\"error\":\"hard time limit\"}}");
        std::process::exit(1);
    });

    let (threads, server_threads) = (o.threads, o.server_threads);
    let sh = Arc::new(Shared {
        start: Barrier::new(threads + server_threads + 1),
        stop: AtomicBool::new(false),
        opts: o,
        sources,
        dsts,
        run_for,
    });
    let mut servers = Vec::new();
    for ls in per_thread {
        let sh = Arc::clone(&sh);
        servers.push(thread::spawn(move || {
            server(ls, sh.opts.closer, &sh.start, &sh.stop)
        }));
    }
    let mut clients = Vec::new();
    let max = sh.opts.max_connections;
    for id in 0..threads {
        let budget = max / threads as u64 + u64::from((id as u64) < max % threads as u64);
        let sh = Arc::clone(&sh);
        clients.push(thread::spawn(move || client(id, &sh, budget)));
    }
    sh.start.wait();
    let began = Instant::now();
    let mut total = Tally::default();
    for c in clients {
        let t = c
            .join()
            .map_err(|_| "a client thread panicked".to_string())?;
        total.made += t.made;
        total.errors += t.errors;
        if total.first_error.is_none() {
            total.first_error = t.first_error;
        }
    }
    let seconds = began.elapsed().as_secs_f64();
    sh.stop.store(true, Ordering::Relaxed);
    let mut accepted = 0u64;
    let mut server_errors = 0u64;
    let mut server_first_error = None;
    for s in servers {
        let t = s
            .join()
            .map_err(|_| "a server thread panicked".to_string())?;
        accepted += t.made;
        server_errors += t.errors;
        if server_first_error.is_none() {
            server_first_error = t.first_error;
        }
    }
    let first_error = total
        .first_error
        .or(server_first_error)
        .map(|e| serde_json::Value::String(e).to_string())
        .unwrap_or_else(|| "null".into());
    println!(
        "{{\"connections\":{},\"seconds\":{:.3},\"connections_per_s\":{:.1},\"errors\":{},\
         \"server_errors\":{},\"accepted\":{},\"first_error\":{},\"closer\":\"{}\",\"family\":{},\
         \"refused\":{},\"client_threads\":{},\"server_threads\":{},\"ports\":{},\"sources\":{}}}",
        total.made,
        seconds,
        total.made as f64 / seconds.max(1e-9),
        total.errors,
        server_errors,
        accepted,
        first_error,
        if sh.opts.closer == Closer::Client {
            "client"
        } else {
            "server"
        },
        if sh.opts.v6 { 6 } else { 4 },
        sh.opts.refused,
        threads,
        server_threads,
        sh.dsts.len(),
        sh.sources.len().max(1),
    );
    drop(closed_ports);
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("twt-loadgen: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twt-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
