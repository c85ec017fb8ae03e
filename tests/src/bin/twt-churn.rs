//! A connection churn generator for the tests and the benchmark: real TCP, bounded in count and
//! time, that says exactly what it did.
//!
//! ```text
//! twt-churn server --listen ADDR:PORT [--closer client|server] [--count N] [--name COMM]
//!                  [--close-after MS] [--no-accept]
//! twt-churn client --to ADDR:PORT --count N [--closer client|server] [--bind ADDR[:PORT]]
//!                  [--keepalive] [--rate PER_S] [--name COMM] [--hold] [--linger0] [--leak]
//!                  [--tolerate-errors]
//! twt-churn namespaces --count N [--per-ns M]
//! ```
//!
//! Each exchange is one byte each way. `--closer client`: the client closes after the reply and
//! the TIME_WAIT stays with the client. `--closer server`: the server closes after reading the
//! request and the TIME_WAIT stays with the server. `--keepalive` carries every request over
//! one connection. `--hold` accepts and never closes (CLOSE_WAIT on the server). `--linger0`
//! closes the client's side with a reset (SO_LINGER 0: no TIME_WAIT at all). `--bind ADDR`
//! without a port binds before connect() with port 0 (bind() picks the port, exclusive to that
//! source address across destinations); with `--bind-no-port` it leaves the port to connect()
//! instead (IP_BIND_ADDRESS_NO_PORT: per destination, as a load balancer does). `--leak` never
//! closes its side (with `--closer server`, CLOSE_WAIT in the client): it prints its line,
//! then keeps the sockets until stdin closes. `--tolerate-errors` goes on after a failed
//! connect(), counting the failures by errno name. The client prints one JSON line: its pid,
//! the local ports it used, in order, and its failures (count by errno, and when the first one
//! came, in seconds from its start).
//! `namespaces` makes N short-lived network namespaces one after the other, each with M
//! connections on its loopback (client closes first: M TIME_WAIT), and lets each go as soon as
//! its traffic is done (the kernel then kills its TIME_WAIT sockets).
//! The server prints `listening` once bound, and serves until `--count` connections or stdin
//! closes. `--close-after MS`: when the client closed first, the server closes its side that
//! long after (the client's socket waits in the FIN_WAIT2 substate meanwhile). `--no-accept`
//! listens and never accepts (connections wait in the accept queue).

use std::{
    io::{BufRead, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};
use twtrace_tests::{monotonic_s, sock::sockaddr};

/// No run lasts longer than this, whatever the arguments.
const MAX_RUN: Duration = Duration::from_secs(600);
const MAX_COUNT: u64 = 10_000_000;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Closer {
    Client,
    Server,
}

struct Opts {
    listen: Option<SocketAddr>,
    to: Option<SocketAddr>,
    bind: Option<SocketAddr>,
    bind_no_port: bool,
    count: u64,
    closer: Closer,
    keepalive: bool,
    hold: bool,
    linger0: bool,
    rate: Option<f64>,
    name: Option<String>,
    leak: bool,
    tolerate_errors: bool,
    per_ns: u64,
    close_after: Option<Duration>,
    no_accept: bool,
}

fn parse(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        listen: None,
        to: None,
        bind: None,
        bind_no_port: false,
        count: 0,
        closer: Closer::Client,
        keepalive: false,
        hold: false,
        linger0: false,
        rate: None,
        name: None,
        leak: false,
        tolerate_errors: false,
        per_ns: 2,
        close_after: None,
        no_accept: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--listen" => o.listen = Some(val()?.parse().map_err(|e| format!("--listen: {e}"))?),
            "--to" => o.to = Some(val()?.parse().map_err(|e| format!("--to: {e}"))?),
            "--bind" => {
                let v = val()?;
                let addr = v
                    .parse::<SocketAddr>()
                    .or_else(|_| {
                        v.parse::<std::net::IpAddr>()
                            .map(|ip| SocketAddr::new(ip, 0))
                    })
                    .map_err(|e| format!("--bind: {e}"))?;
                o.bind = Some(addr);
            }
            "--bind-no-port" => o.bind_no_port = true,
            "--count" => o.count = val()?.parse().map_err(|e| format!("--count: {e}"))?,
            "--closer" => {
                o.closer = match val()?.as_str() {
                    "client" => Closer::Client,
                    "server" => Closer::Server,
                    other => return Err(format!("--closer: {other}")),
                }
            }
            "--keepalive" => o.keepalive = true,
            "--hold" => o.hold = true,
            "--linger0" => o.linger0 = true,
            "--rate" => o.rate = Some(val()?.parse().map_err(|e| format!("--rate: {e}"))?),
            "--name" => o.name = Some(val()?),
            "--leak" => o.leak = true,
            "--tolerate-errors" => o.tolerate_errors = true,
            "--per-ns" => o.per_ns = val()?.parse().map_err(|e| format!("--per-ns: {e}"))?,
            "--close-after" => {
                let ms: u64 = val()?.parse().map_err(|e| format!("--close-after: {e}"))?;
                o.close_after = Some(Duration::from_millis(ms));
            }
            "--no-accept" => o.no_accept = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if o.count > MAX_COUNT {
        return Err(format!("--count is at most {MAX_COUNT}"));
    }
    Ok(o)
}

fn set_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

fn socket_for(addr: &SocketAddr) -> std::io::Result<i32> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Turns an integer socket option on.
fn set_flag(fd: i32, level: libc::c_int, name: libc::c_int) {
    let one: libc::c_int = 1;
    // SAFETY: valid option value pointer and length.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
}

/// connect() from an optional local address (SO_REUSEADDR so a fixed port can be reused while
/// a TIME_WAIT of ours holds it: that is how tcp_tw_reuse gets exercised).
fn connect(
    to: &SocketAddr,
    bind: Option<&SocketAddr>,
    no_port: bool,
) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let fd = socket_for(to)?;
    // SAFETY: fd is ours; from here on the TcpStream closes it.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    if let Some(b) = bind {
        set_flag(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR);
        if no_port && b.port() == 0 {
            // The port is chosen at connect(), per (source, destination), as a load balancer
            // with several source addresses does.
            set_flag(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT);
        }
        let (ss, len) = sockaddr(b);
        // SAFETY: ss holds a valid address of len bytes.
        if unsafe { libc::bind(fd, (&raw const ss).cast(), len) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let (ss, len) = sockaddr(to);
    // SAFETY: as above.
    if unsafe { libc::connect(fd, (&raw const ss).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

fn serve(o: &Opts) -> Result<(), String> {
    let listen = o.listen.ok_or("server needs --listen")?;
    let listener = TcpListener::bind(listen).map_err(|e| format!("bind {listen}: {e}"))?;
    println!(
        "listening {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    std::io::stdout().flush().ok();
    // Stop when stdin closes (the test dropped us) or after MAX_RUN.
    thread::spawn(|| {
        let stdin = std::io::stdin();
        for _ in stdin.lock().lines() {}
        std::process::exit(0);
    });
    thread::spawn(|| {
        thread::sleep(MAX_RUN);
        std::process::exit(0);
    });
    if o.no_accept {
        // Connections wait in the accept queue (the backlog) until stdin closes.
        loop {
            thread::sleep(Duration::from_secs(1));
        }
    }
    let mut held = Vec::new();
    let mut served = 0u64;
    for conn in listener.incoming() {
        let mut s = conn.map_err(|e| format!("accept: {e}"))?;
        served += 1;
        if o.hold {
            // Never close: the peer's close leaves this side in CLOSE_WAIT.
            held.push(s);
        } else {
            let (closer, close_after) = (o.closer, o.close_after);
            thread::spawn(move || {
                let mut b = [0u8; 1];
                while let Ok(1) = s.read(&mut b) {
                    if closer == Closer::Server {
                        // Closing first, with the request read: TIME_WAIT stays here.
                        return;
                    }
                    if s.write_all(&b).is_err() {
                        return;
                    }
                }
                // EOF: the client closed first; close our side (LAST_ACK -> CLOSE), at once or
                // after a while (the client's timewait socket waits in FIN_WAIT2 meanwhile).
                if let Some(d) = close_after {
                    thread::sleep(d);
                }
            });
        }
        if o.count > 0 && served >= o.count && !o.hold {
            // Give the handler threads a moment to finish their exchange.
            thread::sleep(Duration::from_millis(200));
            return Ok(());
        }
    }
    Ok(())
}

fn exchange(s: &mut TcpStream, closer: Closer) -> std::io::Result<()> {
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    match closer {
        Closer::Client => {
            s.read_exact(&mut b)?;
        }
        Closer::Server => {
            // Wait for the server's FIN, then close (LAST_ACK on our side).
            let _ = s.read(&mut b)?;
        }
    }
    Ok(())
}

fn client(o: &Opts) -> Result<(), String> {
    let to = o.to.ok_or("client needs --to")?;
    let deadline = Instant::now() + MAX_RUN;
    let start = Instant::now();
    let mut ports = Vec::with_capacity(o.count as usize);
    let mut keep: Option<TcpStream> = None;
    let mut leaked = Vec::new();
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    let mut first_error: Option<(f64, f64)> = None;
    for i in 0..o.count {
        if Instant::now() > deadline {
            return Err(format!("stopped at {i} connections: time limit"));
        }
        if let Some(rate) = o.rate {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        let mut s = match keep.take() {
            Some(s) => s,
            None => match connect(&to, o.bind.as_ref(), o.bind_no_port) {
                Ok(s) => {
                    ports.push(s.local_addr().map_err(|e| e.to_string())?.port());
                    s
                }
                Err(e) if o.tolerate_errors => {
                    *errors.entry(errno_name(&e)).or_default() += 1;
                    first_error.get_or_insert((start.elapsed().as_secs_f64(), monotonic_s()));
                    continue;
                }
                Err(e) => return Err(format!("connect {to}: {e}")),
            },
        };
        if o.hold {
            // Close right away without waiting: the server holds its end in CLOSE_WAIT.
            s.write_all(b"x").map_err(|e| e.to_string())?;
            drop(s);
            continue;
        }
        if o.keepalive {
            s.write_all(b"x").map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).map_err(|e| e.to_string())?;
            keep = Some(s);
            continue;
        }
        exchange(&mut s, o.closer).map_err(|e| format!("exchange {i}: {e}"))?;
        if o.leak {
            // The server closed after the exchange; this side never does: CLOSE_WAIT here.
            leaked.push(s);
            continue;
        }
        if o.linger0 {
            use std::os::fd::AsRawFd;
            let lg = libc::linger {
                l_onoff: 1,
                l_linger: 0,
            };
            // SAFETY: valid option value and length.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_LINGER,
                    (&raw const lg).cast(),
                    size_of::<libc::linger>() as u32,
                )
            };
        }
    }
    drop(keep);
    let ports: Vec<String> = ports.iter().map(|p| p.to_string()).collect();
    let errors: Vec<String> = errors.iter().map(|(k, n)| format!("\"{k}\":{n}")).collect();
    println!(
        "{{\"pid\":{},\"connections\":{},\"local_ports\":[{}],\"errors\":{{{}}},\"first_error_s\":{},\"first_error_at\":{}}}",
        std::process::id(),
        ports.len(),
        ports.join(","),
        errors.join(","),
        first_error.map_or("null".to_owned(), |t| format!("{:.3}", t.0)),
        first_error.map_or("null".to_owned(), |t| format!("{:.3}", t.1))
    );
    std::io::stdout().flush().ok();
    if o.leak {
        // Hold the sockets until the test lets go (stdin closes), or MAX_RUN.
        thread::spawn(|| {
            thread::sleep(MAX_RUN);
            std::process::exit(0);
        });
        for _ in std::io::stdin().lock().lines() {}
        drop(leaked);
    }
    Ok(())
}

/// `EADDRNOTAVAIL`, `ECONNREFUSED`, ... for an error from a system call.
fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(libc::EADDRINUSE) => "EADDRINUSE".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(n) => format!("errno{n}"),
        None => "other".into(),
    }
}

/// Brings a namespace's loopback up (SIOCSIFFLAGS on `lo`), as `ip link set lo up` does.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: a datagram socket only used for the interface ioctls below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq zeroed, its name set to "lo"; the ioctls read and write it in place.
    let rc = unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        req.ifr_name[0] = b'l' as libc::c_char;
        req.ifr_name[1] = b'o' as libc::c_char;
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &raw mut req);
        if rc == 0 {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &raw mut req);
        }
        libc::close(fd);
        rc
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `namespaces`: N network namespaces made, used and let go one after the other, each by a
/// child process that unshares its network namespace (it is gone when the child exits).
fn namespaces(o: &Opts) -> Result<(), String> {
    let mut made = 0u64;
    for _ in 0..o.count {
        // SAFETY: fork in a single-threaded process; the child only makes system calls and
        // exits with _exit.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", std::io::Error::last_os_error()));
        }
        if pid == 0 {
            let code = match one_namespace(o.per_ns) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("twt-churn namespaces: {e}");
                    1
                }
            };
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &raw mut status, 0) };
        if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
            return Err(format!("namespace {made} failed (status {status})"));
        }
        made += 1;
    }
    println!("{{\"namespaces\":{made},\"per_namespace\":{}}}", o.per_ns);
    Ok(())
}

fn one_namespace(connections: u64) -> Result<(), String> {
    // SAFETY: unshare in a single-threaded child.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!("unshare: {}", std::io::Error::last_os_error()));
    }
    loopback_up().map_err(|e| format!("lo up: {e}"))?;
    let listener = TcpListener::bind("127.0.0.1:7000").map_err(|e| format!("bind: {e}"))?;
    let to = listener.local_addr().map_err(|e| e.to_string())?;
    for _ in 0..connections {
        let mut c = connect(&to, None, false).map_err(|e| format!("connect: {e}"))?;
        let (mut s, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        c.write_all(b"x").map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b).map_err(|e| e.to_string())?;
        // The client closes first: its TIME_WAIT stays in this namespace.
        drop(c);
        let _ = s.read(&mut b);
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first() else {
        eprintln!("usage: twt-churn server|client [options]");
        return ExitCode::from(2);
    };
    let opts = match parse(&args[1..]) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("twt-churn: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(n) = &opts.name {
        set_name(n);
    }
    let r = match mode.as_str() {
        "server" => serve(&opts),
        "client" => client(&opts),
        "namespaces" => namespaces(&opts),
        other => Err(format!("unknown mode {other}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twt-churn: {e}");
            ExitCode::FAILURE
        }
    }
}
