//! Types shared by the kernel programs (`twtrace-ebpf`) and userspace (`twtrace`).
//!
//! Everything that crosses the ring buffer or a map is `#[repr(C)]`, made of plain integers and
//! byte arrays (any bit pattern is a valid value), and defined here once. Userspace never trusts
//! a record's length or kind: see `twtrace::decode`.
#![no_std]

/// Bumped whenever a layout below changes; the kernel writes it into every event header.
pub const EVENT_VERSION: u8 = 3;

/// `kind` of an event (first byte of every ring buffer record).
pub mod kind {
    /// A full socket's state transition (`sock:inet_sock_set_state`); only emitted when a view
    /// asked for transitions (`Config::emit_states`). Layout: [`SockEvent`](super::SockEvent).
    pub const STATE: u8 = 1;
    /// A TIME_WAIT socket was born: its timer started and the full socket's `-> CLOSE` that
    /// follows on the same CPU named the 4-tuple. Layout: [`SockEvent`](super::SockEvent).
    pub const TW_BIRTH: u8 = 2;
    /// `timer_cancel` of a TIME_WAIT timer. Also emitted by the kernel right before an expiry
    /// and before a re-arm; userspace pairs it with what follows on the same CPU.
    /// Layout: [`TimerEvent`](super::TimerEvent).
    pub const TW_CANCEL: u8 = 3;
    /// `timer_expire_entry` of a TIME_WAIT timer: the normal end after 60 s.
    pub const TW_EXPIRE: u8 = 4;
    /// A TIME_WAIT timer started again right after its own cancel on the same CPU: a re-arm
    /// (FIN_WAIT2 substate becoming TIME_WAIT, or a retransmitted FIN restarting the 60 s).
    pub const TW_REARM: u8 = 5;
    /// A listener started a request-socket timer for the 4-tuple of the TIME_WAIT timer that
    /// was cancelled just before on this CPU: a new SYN took the 4-tuple over.
    pub const TW_SYN: u8 = 6;
    /// A connect() that ended before it connected (`SYN_SENT -> CLOSE`): no local port was
    /// free (in the connecting task, with no port yet), or the peer refused, never answered, or
    /// the application gave up. `SockEvent.err` says which. Layout:
    /// [`SockEvent`](super::SockEvent).
    pub const CONNECT_FAIL: u8 = 7;
}

/// Bits of `Header::flags`.
pub mod flags {
    /// `owner` holds a process recorded in process context (connect, close).
    pub const OWNER_KNOWN: u8 = 1 << 0;
    /// The tuple fields are filled.
    pub const HAS_TUPLE: u8 = 1 << 1;
    /// A TW_CANCEL issued inside the `connect()` of the same task to the same destination,
    /// right after its `CLOSE -> SYN_SENT`: tcp_tw_reuse took the TIME_WAIT 4-tuple.
    pub const REUSE: u8 = 1 << 2;
    /// The socket had its local port before connect() (bind() with or without a port, and no
    /// IP_BIND_ADDRESS_NO_PORT): that port is its source address's for every destination.
    pub const BOUND: u8 = 1 << 3;
    /// A TW_CANCEL inside the `connect()` of the same task, right after its
    /// `CLOSE -> SYN_SENT`, whose timewait socket could not be read (typed loads only): the
    /// tuple holds that connect()'s destination (`daddr`, `dport`, in the header's family).
    /// It was tcp_tw_reuse if that is the timewait socket's remote end, known from its birth;
    /// otherwise (on loopback, the connect()'s own SYN killing a TIME_WAIT of the listener's
    /// side) it was not.
    pub const IN_CONNECT: u8 = 1 << 4;
}

/// Who the local side was in the connection.
pub mod role {
    pub const UNKNOWN: u8 = 0;
    /// The local side called `connect()` (`CLOSE -> SYN_SENT` seen).
    pub const CONNECTED: u8 = 1;
    /// The local side was accepted from a listener (`LISTEN -> SYN_RECV` seen).
    pub const ACCEPTED: u8 = 2;
}

/// Counter slots of the per-CPU `COUNTERS` array.
pub mod counter {
    /// Events that found the ring buffer full (lost).
    pub const LOST: u32 = 0;
    /// Events submitted to the ring buffer.
    pub const EMITTED: u32 = 1;
    /// TIME_WAIT timer starts seen (births and re-arms).
    pub const TW_TIMER_STARTS: u32 = 2;
    /// A TIME_WAIT timer start (not a re-arm) that no `-> CLOSE` on its CPU took: a birth
    /// missed (counted when its per-CPU slot is reused).
    pub const BIRTH_UNMATCHED: u32 = 3;
    /// `FIN_WAIT2|CLOSING -> CLOSE` with no TIME_WAIT timer of its own just before: reset, abort or
    /// `tcp_max_tw_buckets` overflow.
    pub const CLOSE_WITHOUT_TW: u32 = 4;
    /// Owner records that could not be stored (map full and not evictable).
    pub const OWNER_STORE_FAILED: u32 = 5;
    /// Forks of a tracked process tree (`exec`) that could not be recorded (map full).
    pub const TRACK_FAILED: u32 = 6;
    /// Failed connect() calls (`kind::CONNECT_FAIL` events produced).
    pub const CONNECT_FAILED: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// TCP states as numbered by the kernel (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;
}

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const COMM_LEN: usize = 16;

/// First 16 bytes of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub version: u8,
    /// `AF_INET`, `AF_INET6`, or 0 when the event carries no tuple.
    pub family: u8,
    pub flags: u8,
    /// CPU the event was produced on: userspace pairs a cancel with what follows on that CPU.
    pub cpu: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC.
    pub ts_ns: u64,
}

/// A connection's addresses, local side first, and the network namespace it lives in: the
/// 4-tuple is only unique within a namespace. IPv4 addresses sit in the first 4 bytes. Ports
/// in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    /// Inode number of the socket's network namespace (`sock_common.skc_net` -> `net.ns.inum`,
    /// what `readlink /proc/PID/ns/net` shows); 0 when it could not be read.
    pub netns: u32,
}

/// The process responsible for a socket, captured in process context.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub tgid: u32,
    pub pid: u32,
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
}

/// Value of the kernel's `OWNERS` map, keyed by the full socket's address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerRecord {
    pub owner: Owner,
    pub role: u8,
    /// Non-zero once `owner` holds a process (a socket has a role from connect() or accept
    /// before close() gives it an owner).
    pub has_owner: u8,
    /// Non-zero when the local port was already bound at connect() (see `flags::BOUND`).
    pub bound: u8,
    pub _pad: [u8; 5],
}

/// `kind::STATE` and `kind::TW_BIRTH`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockEvent {
    pub header: Header,
    pub tuple: Tuple,
    pub owner: Owner,
    /// Address of the full socket (identity while it lives).
    pub skaddr: u64,
    /// Address of the TIME_WAIT timer (identity of the timewait socket while it lives); births only.
    pub timer: u64,
    /// Jiffies until the timer fires (`expires - now` at timer_start); births only.
    pub timeout_jiffies: u32,
    pub old_state: u8,
    pub new_state: u8,
    pub role: u8,
    /// Births: the timewait socket's substate, `tcp_state::TIME_WAIT`, or `FIN_WAIT2` when the
    /// peer has not sent its FIN yet (the timeout is then `tcp_fin_timeout`'s, and the socket
    /// becomes TIME_WAIT, re-armed for 60 s, when that FIN comes).
    pub substate: u8,
    /// Connect failures: `sk_err` (ECONNREFUSED, ETIMEDOUT, ...), 0 when none was set.
    pub err: u32,
    pub _pad: u32,
}

/// `kind::TW_CANCEL`, `TW_EXPIRE`, `TW_REARM`, `TW_SYN`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerEvent {
    pub header: Header,
    pub timer: u64,
    /// Read from the timewait socket itself (cancel, expire, re-arm), so that a TIME_WAIT socket
    /// born before twtrace started is still named when it ends or changes.
    pub tuple: Tuple,
    /// Re-arm only: jiffies until the timer fires again.
    pub timeout_jiffies: u32,
    /// Re-arm only: the substate after it (`tcp_state::TIME_WAIT` once the peer's FIN came).
    pub substate: u8,
    pub _pad: [u8; 3],
}

/// Load-time settings, written by userspace into the program's read-only data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Address of `tw_timer_handler` (/proc/kallsyms).
    pub tw_timer_fn: u64,
    /// Address of `reqsk_timer_handler` (/proc/kallsyms); 0 disables SYN take-over detection.
    pub reqsk_timer_fn: u64,
    /// Offsets from BTF: `inet_timewait_sock.tw_timer`, `request_sock.rsk_timer`,
    /// `timer_list.function`, `sock_common.skc_v6_daddr`, `sock_common.skc_v6_rcv_saddr`.
    pub off_tw_timer: u32,
    pub off_rsk_timer: u32,
    pub off_timer_function: u32,
    /// `timer_list.expires`.
    pub off_timer_expires: u32,
    /// `sock.sk_protocol` and `inet_sock.inet_sport`, for the state tracepoint.
    pub off_sk_protocol: u32,
    pub off_inet_sport: u32,
    pub off_skc_v6_daddr: u32,
    pub off_skc_v6_rcv_saddr: u32,
    /// `sock_common.skc_net` (a `possible_net_t`, whose only member is the `struct net *`), and
    /// `net.ns.inum` (the namespace's inode number). 0: not read (a kernel without network
    /// namespaces).
    pub off_skc_net: u32,
    pub off_net_inum: u32,
    /// `inet_timewait_sock.tw_substate`, `sock.sk_err`, `task_struct.tgid`.
    pub off_tw_substate: u32,
    pub off_sk_err: u32,
    pub off_task_tgid: u32,
    /// Non-zero (`--debug-kernel`): log the rare paths through aya-log.
    pub debug: u8,
    /// Non-zero: load only what the tracepoints hand over, typed by BTF, and never call
    /// `bpf_probe_read_kernel` (`lockdown=confidentiality` removes it: LOCKDOWN_BPF_READ_KERNEL).
    /// The timer programs then cannot read the timewait socket behind a timer: userspace knows
    /// it from its birth, by the timer's address.
    pub typed_only: u8,
    pub _pad2: [u8; 2],
    /// Non-zero (`--all-states`): emit every TCP state transition (`kind::STATE`), and record
    /// the caller of connect() and of the passive close too (only the closer matters to
    /// TIME_WAIT; these transitions' successors run in softirq).
    pub emit_states: u8,
    pub _pad: [u8; 7],
    /// Ask userspace to wake up once this many bytes are waiting; below it, submit silently
    /// (userspace polls on a short timer). Avoids an IRQ-work interrupt per event.
    pub wakeup_bytes: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integers and byte arrays with explicit padding fields.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::OwnerRecord {}
}

/// Layout checks: the kernel and userspace must agree byte for byte.
const _: () = {
    assert!(core::mem::size_of::<Header>() == 16);
    assert!(core::mem::size_of::<Tuple>() == 40);
    assert!(core::mem::size_of::<Owner>() == 32);
    assert!(core::mem::size_of::<SockEvent>() == 120);
    assert!(core::mem::size_of::<TimerEvent>() == 72);
    assert!(core::mem::size_of::<OwnerRecord>() == 40);
};
