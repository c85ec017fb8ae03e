//! What the lifecycle hands on: a TIME_WAIT socket's birth, re-arm and end (with its reason),
//! failed connects and plain state transitions, each with its 4-tuple, namespace and owner.

use twtrace_common::tcp_state;

use crate::kernel::decode::{Conn, Process, Role};

/// TIME_WAIT lasts this long once the peer's FIN is in (TCP_TIMEWAIT_LEN; not tunable).
pub const TIME_WAIT_MS: u64 = 60_000;

/// How long a cancel waits for the event that explains it. The explaining event is produced
/// within microseconds on the same CPU; this only bounds how late an early death is reported
/// when that CPU then goes quiet.
pub const SETTLE_NS: u64 = 50_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Expired,
    Reused,
    Syn,
    Killed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Expired => "expired",
            Reason::Reused => "reused",
            Reason::Syn => "syn",
            Reason::Killed => "killed",
        }
    }
}

/// A timewait socket's substate: TIME_WAIT, or FIN_WAIT2 while the peer has not sent its FIN
/// (then its timer is `tcp_fin_timeout`'s; when the FIN comes it becomes TIME_WAIT for 60 s).
/// `ss` lists the second kind under fin-wait-2; sockstat's `tw` counts both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Substate {
    TimeWait,
    FinWait2,
}

impl Substate {
    /// From the kernel's state number (`tw_substate`); anything else is taken as TIME_WAIT.
    pub fn from_kernel(state: u8) -> Self {
        if state == tcp_state::FIN_WAIT2 {
            Substate::FinWait2
        } else {
            Substate::TimeWait
        }
    }

    /// At a birth whose timewait socket could not be read (`substate` 0: under
    /// lockdown=confidentiality), from its timer: TIME_WAIT lasts TCP_TIMEWAIT_LEN (60 s), the
    /// FIN_WAIT2 substate tcp_fin_timeout (tcp_time_wait, net/ipv4/tcp_minisocks.c). A
    /// difference of a jiffy or two is the clock ticking between arming and reading. With
    /// tcp_fin_timeout at 60 s the two cannot be told apart: TIME_WAIT. `tw_len_jiffies`: 60 s in
    /// jiffies (None: CONFIG_HZ unknown, TIME_WAIT).
    pub fn at_birth(kernel: u8, timeout_jiffies: u32, tw_len_jiffies: Option<u32>) -> Self {
        match (kernel, tw_len_jiffies) {
            (0, Some(len)) if timeout_jiffies.abs_diff(len) > 2 => Substate::FinWait2,
            _ => Self::from_kernel(kernel),
        }
    }

    /// The kernel's name, as `twtrace watch` and the JSON show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Substate::TimeWait => "TIME_WAIT",
            Substate::FinWait2 => "FIN_WAIT2",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TwEnter {
    pub ts_ns: u64,
    pub timer: u64,
    pub conn: Conn,
    /// Inode number of the network namespace (0: unknown).
    pub netns: u32,
    pub owner: Option<Process>,
    pub role: Role,
    /// The kernel's timer, in jiffies: the TIME_WAIT length, or for the FIN_WAIT2 substate
    /// how long it waits for the peer's FIN (`tcp_fin_timeout`). 0 when not known (seeded).
    pub timeout_jiffies: u32,
    pub substate: Substate,
    /// The local port was bound before connect(): it is its source address's, whatever the
    /// destination.
    pub bound: bool,
    /// Listed by sock_diag at start (born before twtrace): no owner, no timer, not a birth.
    pub seeded: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TwExit {
    pub ts_ns: u64,
    pub timer: u64,
    /// None only when the kernel could not read the 4-tuple of a socket born before start.
    pub conn: Option<Conn>,
    pub netns: u32,
    pub owner: Option<Process>,
    pub role: Role,
    pub reason: Reason,
    /// None for a TIME_WAIT socket born before twtrace started.
    pub lifetime_ns: Option<u64>,
    /// Its substate when it ended (FIN_WAIT2: the peer never sent its FIN).
    pub substate: Substate,
    /// It was seeded at start (see `Lifecycle::seed`).
    pub seeded: bool,
}

/// A timewait socket's timer started again: the FIN_WAIT2 substate became TIME_WAIT (the peer's
/// FIN came: 60 s from now), or a retransmitted FIN restarted the 60 s of a TIME_WAIT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TwRearm {
    pub ts_ns: u64,
    pub timer: u64,
    pub conn: Conn,
    pub netns: u32,
    pub owner: Option<Process>,
    pub role: Role,
    pub from: Substate,
    pub to: Substate,
    pub timeout_jiffies: u32,
    pub seeded: bool,
}

/// Why a connect() never connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailReason {
    /// No local port was free (EADDRNOTAVAIL, before any SYN).
    NoPort,
    /// The peer answered with a reset (ECONNREFUSED).
    Refused,
    /// No answer (ETIMEDOUT).
    Timeout,
    /// No route (EHOSTUNREACH, ENETUNREACH).
    Unreachable,
    /// Closed by the application before it connected.
    Aborted,
    /// Another error.
    Other,
}

impl FailReason {
    pub const ALL: [FailReason; 6] = [
        FailReason::NoPort,
        FailReason::Refused,
        FailReason::Timeout,
        FailReason::Unreachable,
        FailReason::Aborted,
        FailReason::Other,
    ];

    /// From what the kernel left on the socket: no local port means none could be found
    /// (tcp_v4_connect's failure path sets no error on the socket), else `sk_err`.
    pub fn from_kernel(local_port: u16, err: u32) -> Self {
        match (local_port, err as i32) {
            (0, 0) => FailReason::NoPort,
            (_, libc::ECONNREFUSED) => FailReason::Refused,
            (_, libc::ETIMEDOUT) => FailReason::Timeout,
            (_, libc::EHOSTUNREACH | libc::ENETUNREACH) => FailReason::Unreachable,
            (_, 0) => FailReason::Aborted,
            _ => FailReason::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FailReason::NoPort => "no_port",
            FailReason::Refused => "refused",
            FailReason::Timeout => "timeout",
            FailReason::Unreachable => "unreachable",
            FailReason::Aborted => "aborted",
            FailReason::Other => "other",
        }
    }

    /// The errno a program saw, by name.
    pub fn errno(self) -> &'static str {
        match self {
            FailReason::NoPort => "EADDRNOTAVAIL",
            FailReason::Refused => "ECONNREFUSED",
            FailReason::Timeout => "ETIMEDOUT",
            FailReason::Unreachable => "EHOSTUNREACH",
            FailReason::Aborted => "-",
            FailReason::Other => "-",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// A connect() that never connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectFailure {
    pub ts_ns: u64,
    /// The local port is 0 when none could be found.
    pub conn: Conn,
    pub netns: u32,
    /// Who called connect() (recorded then; refused and unanswered ones end in softirq).
    pub owner: Option<Process>,
    pub reason: FailReason,
    /// `sk_err` as the kernel left it.
    pub err: u32,
    pub bound: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub ts_ns: u64,
    pub conn: Conn,
    pub netns: u32,
    pub old_state: u8,
    pub new_state: u8,
    pub owner: Option<Process>,
    pub role: Role,
    pub skaddr: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Enter(TwEnter),
    Exit(TwExit),
    Rearm(TwRearm),
    State(Transition),
    ConnectFail(ConnectFailure),
}

impl Event {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::Enter(e) => e.ts_ns,
            Event::Exit(e) => e.ts_ns,
            Event::Rearm(e) => e.ts_ns,
            Event::State(e) => e.ts_ns,
            Event::ConnectFail(e) => e.ts_ns,
        }
    }

    /// The connection, when known (an end of a socket born before start may not say).
    pub fn conn(&self) -> Option<&Conn> {
        match self {
            Event::Enter(e) => Some(&e.conn),
            Event::Exit(e) => e.conn.as_ref(),
            Event::Rearm(e) => Some(&e.conn),
            Event::State(e) => Some(&e.conn),
            Event::ConnectFail(e) => Some(&e.conn),
        }
    }

    /// Inode number of the event's network namespace (0: unknown).
    pub fn netns(&self) -> u32 {
        match self {
            Event::Enter(e) => e.netns,
            Event::Exit(e) => e.netns,
            Event::Rearm(e) => e.netns,
            Event::State(e) => e.netns,
            Event::ConnectFail(e) => e.netns,
        }
    }

    pub fn owner(&self) -> Option<&Process> {
        match self {
            Event::Enter(e) => e.owner.as_ref(),
            Event::Exit(e) => e.owner.as_ref(),
            Event::Rearm(e) => e.owner.as_ref(),
            Event::State(e) => e.owner.as_ref(),
            Event::ConnectFail(e) => e.owner.as_ref(),
        }
    }

    pub fn role(&self) -> Role {
        match self {
            Event::Enter(e) => e.role,
            Event::Exit(e) => e.role,
            Event::Rearm(e) => e.role,
            Event::State(e) => e.role,
            Event::ConnectFail(_) => Role::Connected,
        }
    }
}
