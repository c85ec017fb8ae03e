//! twtrace's kernel side: BTF tracepoints on TCP state changes and on the TIME_WAIT timer, one
//! ring buffer; for `exec`, the fork tracepoint (a BTF tracepoint too); and, for the benchmark's
//! floor, the same four hooks with programs that return at once.
//!
//! What the kernel does, and why the programs are shaped this way (measured on Linux 6.18, see
//! ARCHITECTURE.md and the kernel notes):
//!
//! * `sock:inet_sock_set_state` never reports TIME_WAIT. `tcp_time_wait()` allocates a separate
//!   `inet_timewait_sock`, arms its timer (`tw_timer_handler`) and then `tcp_done()` moves the full
//!   socket `FIN_WAIT2|CLOSING -> CLOSE`, on the same CPU. Usually nothing comes between; but
//!   the hash dance re-enables bottom halves before `tcp_done()`, so in process context
//!   (release_sock working off a backlog) pending softirqs, other sockets' changes included,
//!   may run in between.
//! * So a TIME_WAIT timer start leaves a per-CPU "pending birth" (the last few, for a moment);
//!   the next `FIN_WAIT2|CLOSING -> CLOSE` on that CPU whose ports (and IPv4 addresses) equal a
//!   pending timewait socket's own takes it: the birth is certain and carries the full socket's
//!   owner.
//! * The owner is recorded in process context only (`connect()` and `close()`); the softirq
//!   transitions run on behalf of whichever task was interrupted. TIME_WAIT is charged to whoever
//!   closed first, so the record at close is the one that counts for it; the record at connect
//!   names who a failed connect() was for (refused and unanswered ones end in softirq or in a
//!   timer).
//! * Every end of a timewait socket passes through `timer_cancel` (expiry detaches the timer
//!   first, a re-arm cancels then starts, an early kill shuts it down). The programs report the
//!   facts; userspace pairs a cancel with what follows it on the same CPU.
//!
//! One file of about 1,000 lines, on purpose (as libbpf-tools keeps one `.bpf.c` per tool):
//! the programs share per-CPU scratch state whose order of use *is* the design (a timer start
//! leaves a pending birth that its socket's `-> CLOSE` takes; a cancel waits for what follows
//! on its CPU), and every helper is `#[inline(always)]` into the program that the verifier
//! walks as one. Read top to bottom it is that sequence; split, it would be hidden.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel_buf,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_ns,
            bpf_probe_read_kernel, bpf_skc_to_tcp_sock,
        },
    },
    macros::{btf_tracepoint, map},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::BtfTracePointContext,
};
use aya_log_ebpf::debug;
use twtrace_common::{
    AF_INET, AF_INET6, Config, EVENT_VERSION, Header, Owner, OwnerRecord, SockEvent, TimerEvent,
    Tuple, counter, flags, kind, role, tcp_state as st,
};

const IPPROTO_TCP: u16 = 6;
/// Default ring buffer size; userspace sets the real one at load (`--ring-size`).
const RING_BYTES: u32 = 4 << 20;
/// Bound of the owner map. Entries are removed at `-> CLOSE`; LRU eviction covers sockets that
/// never get there (a leaked entry can never grow the map past this).
const OWNERS_MAX: u32 = 65536;
/// Processes (and threads: the tracepoint cannot tell them apart) of one tracked tree.
const TRACKED_MAX: u32 = 65536;
/// A `connect()` that reuses a TIME_WAIT 4-tuple kills it within the same system call, after
/// its `CLOSE -> SYN_SENT`; the port search in between is bounded but can scan a whole range.
const REUSE_WINDOW_NS: u64 = 100_000_000;
/// TIME_WAIT timer starts a CPU keeps for the `-> CLOSE` they belong to (see `TwStart`).
const STARTS: usize = 4;
/// How long a TIME_WAIT timer start waits for its `-> CLOSE`: tcp_time_wait's softirqs run in
/// between are bounded by the kernel (MAX_SOFTIRQ_TIME, 2 ms, then ksoftirqd), but a virtual
/// CPU can be stopped for longer between two instructions (emulated guests take turns on one
/// host thread). A start older than this was a re-arm, never a birth.
const START_WINDOW_NS: u64 = 1_000_000_000;

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(RING_BYTES, 0);

#[map]
static OWNERS: LruHashMap<u64, OwnerRecord> = LruHashMap::with_max_entries(OWNERS_MAX, 0);

#[map]
static SCRATCH: PerCpuArray<CpuScratch> = PerCpuArray::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// `exec`: the processes of the command's tree (tgid -> 1). Userspace puts itself in before
/// spawning the command; `sched_process_fork` adds every child of a member.
#[map]
static TRACKED: HashMap<u32, u8> = HashMap::with_max_entries(TRACKED_MAX, 0);

/// Written by userspace at load time (read-only for the programs).
#[unsafe(no_mangle)]
static CONFIG: Config = Config {
    tw_timer_fn: 0,
    reqsk_timer_fn: 0,
    off_tw_timer: 0,
    off_rsk_timer: 0,
    off_timer_function: 0,
    off_timer_expires: 0,
    off_sk_protocol: 0,
    off_inet_sport: 0,
    off_skc_v6_daddr: 0,
    off_skc_v6_rcv_saddr: 0,
    off_skc_net: 0,
    off_net_inum: 0,
    off_tw_substate: 0,
    off_sk_err: 0,
    off_task_tgid: 0,
    debug: 0,
    typed_only: 0,
    _pad2: [0; 2],
    emit_states: 0,
    _pad: [0; 7],
    wakeup_bytes: 0,
};

/// A TIME_WAIT timer started on this CPU and not yet joined to the `FIN_WAIT2|CLOSING -> CLOSE`
/// of its full socket. Not simply "the next hit": tcp_time_wait arms the timer inside the
/// hash dance, then re-enables bottom halves (local_bh_enable) before tcp_done closes the full
/// socket. Called in process context (release_sock working off the socket's backlog, as when
/// the peer's FIN arrived while the closing task held the socket), pending softirqs run right
/// there: other sockets' state changes, cancels, even whole births of other sockets come
/// between a start and its `-> CLOSE`.
#[repr(C)]
#[derive(Clone, Copy)]
struct TwStart {
    timer: u64,
    timeout: u64,
    /// bpf_ktime_get_ns at the start; 0: free (or joined).
    ts: u64,
    /// Right after a cancel of the same timer: a re-arm (or a freed timewait socket's memory
    /// reused at once for a new one).
    rearm: u64,
}

/// What one CPU remembers between tracepoint hits. The `cancel_*` and `connect_*` slots only
/// describe the hit right before (cleared, never trusted, after); the starts wait for their
/// `-> CLOSE`, bounded by START_WINDOW_NS.
#[repr(C)]
struct CpuScratch {
    /// The last STARTS TIME_WAIT timer starts, a ring; the newest at `(next_start - 1) % STARTS`.
    starts: [TwStart; STARTS],
    next_start: u64,
    /// TIME_WAIT timer cancelled just now (0: none), and its ports (`skc_portpair`).
    cancel_timer: u64,
    /// The task the cancel ran in (under a softirq, the task it interrupted).
    cancel_pid_tgid: u64,
    cancel_portpair: u32,
    /// The cancel just now looked like tcp_tw_reuse (never a SYN take-over).
    cancel_reuse: u32,
    connect_family: u16,
    connect_dport: u16,
    /// Last `CLOSE -> SYN_SENT` on this CPU: who, when, to where.
    connect_pid_tgid: u64,
    connect_ts: u64,
    connect_daddr: [u8; 16],
}

/// The start of `struct sock_common`, the same in full, request and timewait sockets. Its layout
/// has not changed in many kernel releases; the IPv6 addresses further in come from BTF.
#[repr(C)]
#[derive(Clone, Copy)]
struct SkcHead {
    daddr: [u8; 4],
    rcv_saddr: [u8; 4],
    hash: u32,
    /// `skc_dport` (network order) and `skc_num` (host order), read as one word too.
    dport_be: u16,
    num: u16,
    family: u16,
    _pad: u16,
}

/// Reads one CONFIG field. The volatile read stops the compiler from folding the zero
/// initialiser into the code (userspace rewrites the value before load); reading field by field
/// keeps the 512-byte BPF stack free.
macro_rules! config {
    ($field:ident) => {
        read_config(&raw const CONFIG.$field)
    };
}

#[inline(always)]
fn read_config<T: Copy>(field: *const T) -> T {
    // SAFETY: points into CONFIG, plain data that lives as long as the program.
    unsafe { core::ptr::read_volatile(field) }
}

/// `--debug-kernel`: whether the rare paths log (a frozen read-only value: when 0 the verifier
/// drops the logging code as dead, so it costs nothing).
#[inline(always)]
fn debugging() -> bool {
    config!(debug) != 0
}

/// Whether only typed loads are allowed (`lockdown=confidentiality`: no `bpf_probe_read_kernel`).
/// A frozen read-only value: the verifier never walks the branches it rules out, so a program
/// whose helper calls all sit behind `!typed_only()` loads under that lockdown.
#[inline(always)]
fn typed_only() -> bool {
    config!(typed_only) != 0
}

#[inline(always)]
fn bump(slot: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, programs do not migrate while running.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn scratch() -> Option<&'static mut CpuScratch> {
    // SAFETY: per-CPU value; one program runs at a time on a CPU for these hooks (the kernel
    // skips a nested run and counts it in the program's recursion_misses).
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[inline(always)]
fn header(kind: u8, family: u8, flags: u8) -> Header {
    Header {
        kind,
        version: EVENT_VERSION,
        family,
        flags,
        // SAFETY: helpers without arguments.
        cpu: unsafe { bpf_get_smp_processor_id() },
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Submits without waking userspace unless enough data is waiting: a wake-up per event costs an
/// IRQ-work interrupt, most of what the classic tools pay per event.
#[inline(always)]
fn submit_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= config!(wakeup_bytes) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Reserves a zeroed record of type `$t` in the ring buffer, runs `$body` with `$e` pointing
/// at it (written in place: no copy of the event on the stack), and submits it; counts it as
/// lost when the ring is full. A macro rather than a function taking a closure: a closure the
/// compiler leaves out of line becomes a BPF subprogram, and LLVM may leave a stack pointer in
/// r0 when such a `()` function returns, which the verifier refuses ("cannot return stack
/// pointer to the caller").
macro_rules! emit {
    ($t:ty, |$e:ident| $body:block) => {
        match EVENTS.reserve::<$t>(0) {
            Some(mut entry) => {
                let p = entry.as_mut_ptr();
                // SAFETY: the reservation is size_of::<$t>() bytes, 8-byte aligned, and every
                // event type is a multiple of 8 bytes made of plain integers (all-zero is a
                // valid value). Volatile stores: a memset here would become a call the verifier
                // walks byte by byte.
                let $e: &mut $t = unsafe {
                    let words = p.cast::<u64>();
                    for i in 0..size_of::<$t>() / 8 {
                        core::ptr::write_volatile(words.add(i), 0);
                    }
                    &mut *p
                };
                $body
                entry.submit(submit_flags());
                bump(counter::EMITTED);
            }
            None => bump(counter::LOST),
        }
    };
}

#[inline(always)]
fn current_owner(o: &mut Owner) {
    let pid_tgid = bpf_get_current_pid_tgid();
    o.tgid = (pid_tgid >> 32) as u32;
    o.pid = pid_tgid as u32;
    // SAFETY: helper without arguments.
    o.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    o.comm = bpf_get_current_comm().unwrap_or_default();
}

/// Copies the owner recorded for `skaddr` into an event; returns (role, flags).
#[inline(always)]
fn recorded_owner(skaddr: u64, o: &mut Owner) -> (u8, u8) {
    match OWNERS.get_ptr(&skaddr) {
        // SAFETY: read at once; a concurrent update can only make it a fresher owner.
        Some(r) => unsafe {
            let bound = if (*r).bound != 0 { flags::BOUND } else { 0 };
            if (*r).has_owner != 0 {
                *o = (*r).owner;
                ((*r).role, flags::OWNER_KNOWN | bound)
            } else {
                ((*r).role, bound)
            }
        },
        None => (role::UNKNOWN, 0),
    }
}

/// A kernel value read through `bpf_probe_read_kernel` (any address is tolerated), or `zero`
/// when the read fails. The destination is initialised before the call: older verifiers (5.10)
/// refuse a program that may read a stack slot the helper did not fill on its failure path.
#[inline(always)]
fn kread<T: Copy>(src: u64, zero: T) -> Option<T> {
    let mut v = zero;
    // SAFETY: `v` is a valid, initialised destination of size_of::<T>() bytes; the helper
    // checks the source address itself.
    let rc = unsafe {
        bpf_probe_read_kernel(
            (&raw mut v).cast(),
            size_of::<T>() as u32,
            src as *const core::ffi::c_void,
        )
    };
    (rc == 0).then_some(v)
}

/// The start of a timewait or request socket's `sock_common`.
#[inline(always)]
fn read_skc(skc: u64) -> Option<SkcHead> {
    kread(
        skc,
        SkcHead {
            daddr: [0; 4],
            rcv_saddr: [0; 4],
            hash: 0,
            dport_be: 0,
            num: 0,
            family: 0,
            _pad: 0,
        },
    )
}

/// A head that is not known: zeros.
const SKC_UNKNOWN: SkcHead = SkcHead {
    daddr: [0; 4],
    rcv_saddr: [0; 4],
    hash: 0,
    dport_be: 0,
    num: 0,
    family: 0,
    _pad: 0,
};

/// `read_skc` for the timer programs, none under `typed_only`: whether it was read, and a head
/// that is a value on every path (zeros when unknown). Matching on an `Option<SkcHead>` left on
/// the stack let LLVM load the head's fields before testing which it was; for `None` those
/// stack slots were never written, and 5.10's verifier refuses such a read (`invalid read from
/// stack`; 6.1's allows it to root).
#[inline(always)]
fn timer_skc(skc: u64) -> (bool, SkcHead) {
    if typed_only() {
        return (false, SKC_UNKNOWN);
    }
    match read_skc(skc) {
        Some(h) => (true, h),
        None => (false, SKC_UNKNOWN),
    }
}

/// The network namespace of a timewait socket (`skc_net` -> `net.ns.inum`), 0 when unknown.
/// Read through helpers: the socket is reached from its timer's address, not from a typed
/// tracepoint argument, so the verifier cannot check direct loads from it.
#[inline(always)]
fn skc_netns(skc: u64) -> u32 {
    let off = config!(off_skc_net);
    if off == 0 {
        return 0;
    }
    match kread(skc + off as u64, 0u64) {
        Some(net) if net != 0 => kread(net + config!(off_net_inum) as u64, 0u32).unwrap_or(0),
        _ => 0,
    }
}

/// The 4-tuple of a timewait socket, local side first (its namespace is filled apart).
#[inline(always)]
fn skc_tuple(skc: u64, head: &SkcHead, t: &mut Tuple) {
    t.sport = head.num;
    t.dport = u16::from_be(head.dport_be);
    if head.family == AF_INET6 as u16 {
        // SAFETY: as above; offsets from BTF. A failed read leaves zeroes.
        unsafe {
            let _ = bpf_probe_read_kernel_buf(
                (skc + config!(off_skc_v6_rcv_saddr) as u64) as *const u8,
                &mut t.saddr,
            );
            let _ = bpf_probe_read_kernel_buf(
                (skc + config!(off_skc_v6_daddr) as u64) as *const u8,
                &mut t.daddr,
            );
        }
    } else {
        t.saddr[..4].copy_from_slice(&head.rcv_saddr);
        t.daddr[..4].copy_from_slice(&head.daddr);
    }
}

/// `::ffff:a.b.c.d`: an IPv4 address in an IPv6 socket.
#[inline(always)]
fn v4_mapped(a: &[u8; 16]) -> bool {
    a[..10] == [0; 10] && a[10] == 0xff && a[11] == 0xff
}

#[inline(always)]
fn portpair(head: &SkcHead) -> u32 {
    (head.dport_be as u32) << 16 | head.num as u32
}

// ---------------------------------------------------------------------------------------------
// sock:inet_sock_set_state

/// A field of the socket handed to a BTF tracepoint, loaded directly: the verifier knows the
/// pointer's type and checks each load against it (no helper call).
#[inline(always)]
fn sk_field<T: Copy>(sk: *const u8, offset: usize) -> T {
    // SAFETY: `sk` is the tracepoint's typed `struct sock *`; offsets lie inside it (the
    // `sock_common` head, or `sk_protocol` from BTF).
    unsafe { core::ptr::read_volatile(sk.add(offset).cast::<T>()) }
}

/// The socket whose state changes: its `sock_common` head, loaded once.
struct Socket {
    sk: u64,
    old: u8,
    new: u8,
    head: SkcHead,
}

impl Socket {
    #[inline(always)]
    fn family(&self) -> u8 {
        self.head.family as u8
    }

    /// From `inet_sock` (`skc_num` is already 0 at `-> CLOSE`: the port is released first).
    /// It lies beyond `struct sock`, where the verifier allows no load from the tracepoint's
    /// pointer: `bpf_skc_to_tcp_sock` hands the same socket back typed as a `tcp_sock` (whose
    /// first member is the `inet_sock`), a load from it then is a typed load too (no
    /// `bpf_probe_read_kernel`, so it works under lockdown=confidentiality). Read only when
    /// needed.
    #[inline(always)]
    fn sport(&self) -> u16 {
        // SAFETY: `sk` is the tracepoint's typed socket; the helper checks it is a full TCP
        // socket and returns null otherwise.
        let tcp = unsafe { bpf_skc_to_tcp_sock(self.sk as *mut core::ffi::c_void) } as *const u8;
        if tcp.is_null() {
            return 0;
        }
        // SAFETY: typed `struct tcp_sock *`; `inet_sport` at its BTF offset inside it.
        u16::from_be(unsafe {
            core::ptr::read_volatile(tcp.add(config!(off_inet_sport) as usize).cast::<u16>())
        })
    }

    /// An IPv6 address of `sock_common` (offset from BTF), in two typed loads.
    #[inline(always)]
    fn v6(&self, offset: u32) -> [u8; 16] {
        let lo = sk_field::<u64>(self.sk as *const u8, offset as usize);
        let hi = sk_field::<u64>(self.sk as *const u8, offset as usize + 8);
        let mut a = [0u8; 16];
        a[..8].copy_from_slice(&lo.to_ne_bytes());
        a[8..].copy_from_slice(&hi.to_ne_bytes());
        a
    }

    /// The socket's network namespace: `sk->__sk_common.skc_net.net->ns.inum`, two direct
    /// loads (the verifier types the loaded `struct net *` from BTF, so no helper call).
    #[inline(always)]
    fn netns(&self) -> u32 {
        let off = config!(off_skc_net);
        if off == 0 {
            return 0;
        }
        let net = sk_field::<u64>(self.sk as *const u8, off as usize) as *const u8;
        if net.is_null() {
            return 0;
        }
        // SAFETY: `net` is the socket's typed `struct net *`; the offset of `ns.inum` comes
        // from BTF (frozen read-only data, a constant for the verifier).
        unsafe { core::ptr::read_volatile(net.add(config!(off_net_inum) as usize).cast::<u32>()) }
    }

    #[inline(always)]
    fn dport(&self) -> u16 {
        u16::from_be(self.head.dport_be)
    }

    /// (local, remote) IPv4 addresses, network order.
    #[inline(always)]
    fn v4(&self) -> ([u8; 4], [u8; 4]) {
        (self.head.rcv_saddr, self.head.daddr)
    }

    /// The 4-tuple and namespace, local side first, with the source port already read: all
    /// typed loads from the tracepoint's socket.
    #[inline(always)]
    fn tuple(&self, sport: u16, t: &mut Tuple) {
        t.sport = sport;
        t.dport = self.dport();
        if self.head.family == AF_INET6 as u16 {
            t.saddr = self.v6(config!(off_skc_v6_rcv_saddr));
            t.daddr = self.v6(config!(off_skc_v6_daddr));
        } else {
            t.saddr[..4].copy_from_slice(&self.head.rcv_saddr);
            t.daddr[..4].copy_from_slice(&self.head.daddr);
        }
        t.netns = self.netns();
    }
}

/// `inet_sock_set_state(const struct sock *sk, int oldstate, int newstate)`, as a BTF
/// tracepoint: no trace record is built; the program loads only what it needs from the socket.
#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: BtfTracePointContext) -> i32 {
    let sk: *const u8 = ctx.arg(0);
    if sk_field::<u16>(sk, config!(off_sk_protocol) as usize) != IPPROTO_TCP {
        return 0;
    }
    // The start of sock_common: see SkcHead.
    let head = SkcHead {
        daddr: sk_field::<u32>(sk, 0).to_ne_bytes(),
        rcv_saddr: sk_field::<u32>(sk, 4).to_ne_bytes(),
        hash: 0,
        dport_be: sk_field(sk, 12),
        num: sk_field(sk, 14),
        family: sk_field(sk, 16),
        _pad: 0,
    };
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    on_state(&Socket {
        sk: sk as u64,
        old: old as u8,
        new: new as u8,
        head,
    });
    0
}

#[inline(always)]
fn on_state(c: &Socket) {
    let Some(s) = scratch() else { return };
    let (old, new, skaddr, family) = (c.old, c.new, c.sk, c.family());
    let all_states = config!(emit_states) != 0;

    // Only describes the hit right before this one.
    s.cancel_timer = 0;

    match (old, new) {
        (st::CLOSE, st::SYN_SENT) => {
            // connect(), in process context. tcp_v4_connect/tcp_v6_connect set SYN_SENT before
            // they pick a local port (inet_hash_connect): a port already set here was bound
            // before connect(), and is then that source address's for every destination.
            // Remember the destination to recognise tcp_tw_reuse, and the caller: a TIME_WAIT
            // is charged to whoever closes, a failed connect() to whoever called it.
            let mut record = OwnerRecord {
                role: role::CONNECTED,
                has_owner: 1,
                bound: (c.head.num != 0) as u8,
                ..OwnerRecord::default()
            };
            current_owner(&mut record.owner);
            store_owner(skaddr, &record, BPF_ANY);
            s.connect_pid_tgid = bpf_get_current_pid_tgid();
            // SAFETY: helper without arguments.
            s.connect_ts = unsafe { bpf_ktime_get_ns() };
            s.connect_family = family as u16;
            s.connect_dport = c.dport();
            if family == AF_INET6 {
                s.connect_daddr = c.v6(config!(off_skc_v6_daddr));
                // To ::ffff:a.b.c.d an AF_INET6 socket connects over IPv4, and can take over
                // an AF_INET timewait socket: remembered as IPv4.
                if v4_mapped(&s.connect_daddr) {
                    let d = s.connect_daddr;
                    s.connect_family = AF_INET as u16;
                    s.connect_daddr = [
                        d[12], d[13], d[14], d[15], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    ];
                }
            } else {
                s.connect_daddr = [0; 16];
                s.connect_daddr[..4].copy_from_slice(&c.head.daddr);
            }
        }
        (st::LISTEN, st::SYN_RECV) => {
            // A child socket cloned from a listener, in softirq: the role is known, the owner is
            // not (accept() changes no state); close() will fill it in.
            let record = OwnerRecord {
                role: role::ACCEPTED,
                ..OwnerRecord::default()
            };
            store_owner(skaddr, &record, BPF_NOEXIST);
        }
        (st::ESTABLISHED | st::SYN_RECV, st::FIN_WAIT1) => record_closer(skaddr),
        // The passive close never leads to TIME_WAIT: its closer only matters to
        // `--all-states` (the socket's last transitions run in softirq).
        (st::CLOSE_WAIT, st::LAST_ACK) if all_states => record_closer(skaddr),
        // connect() failed: either in the connecting task itself, before any SYN, because no
        // local port was free (tcp_v4_connect's failure path: no port set, sk_err 0), or later
        // in softirq or a timer (refused, unanswered: sk_err says), or the application closed
        // the socket before it connected.
        (st::SYN_SENT, st::CLOSE) => on_connect_failed(c),
        // tcp_time_wait is only called in these two states (tcp_fin, tcp_rcv_state_process,
        // tcp_close and the keepalive timer's FIN_WAIT2 case), and closes the full socket
        // right after arming the timewait socket's timer.
        (st::FIN_WAIT2 | st::CLOSING, st::CLOSE) => on_close_after_fin(s, c),
        _ => {}
    }

    if all_states {
        emit!(SockEvent, |e| {
            let (rl, fl) = recorded_owner(skaddr, &mut e.owner);
            e.header = header(kind::STATE, family, fl | flags::HAS_TUPLE);
            c.tuple(c.sport(), &mut e.tuple);
            e.skaddr = skaddr;
            e.old_state = old;
            e.new_state = new;
            e.role = rl;
        });
    }

    if new == st::CLOSE {
        // The full socket is gone; its address will be reused.
        let _ = OWNERS.remove(&skaddr);
    }
}

/// close() or shutdown(), in process context: the caller is responsible for what follows
/// (TIME_WAIT on the active side). Updated in place when recorded already.
#[inline(always)]
fn record_closer(skaddr: u64) {
    match OWNERS.get_ptr_mut(&skaddr) {
        // SAFETY: the value lives in the map; written field by field.
        Some(r) => unsafe {
            current_owner(&mut (*r).owner);
            (*r).has_owner = 1;
        },
        None => {
            let mut record = OwnerRecord {
                has_owner: 1,
                ..OwnerRecord::default()
            };
            current_owner(&mut record.owner);
            store_owner(skaddr, &record, BPF_ANY);
        }
    }
}

#[inline(always)]
fn store_owner(skaddr: u64, record: &OwnerRecord, how: u32) {
    if OWNERS.insert(&skaddr, record, how as u64).is_err() && how != BPF_NOEXIST {
        bump(counter::OWNER_STORE_FAILED);
        if debugging() {
            // (No pointer is logged: the verifier forbids the arithmetic that formats one.)
            debug!(&(), "the owner of a socket was not stored: owner map full");
        }
    }
}

/// `FIN_WAIT2|CLOSING -> CLOSE`: a birth if a TIME_WAIT timer started on this CPU moments ago
/// for this socket (the timewait socket has its 4-tuple; under typed_only, the newest start),
/// else a close without TIME_WAIT (a reset, an abort, or tcp_max_tw_buckets overflow).
#[inline(always)]
fn on_close_after_fin(s: &mut CpuScratch, c: &Socket) {
    let sport = c.sport();
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let newest = s.next_start;
    let mut found: Option<(usize, u8)> = None;
    // Newest first: a birth nested in another's window is joined before the outer one.
    // Under typed_only a start right after a cancel of the same timer (a re-arm, in a softirq
    // run in the window) is only taken when no plain start is there.
    for pass in 0..2u64 {
        if found.is_some() || (pass == 1 && !typed_only()) {
            break;
        }
        for k in 1..=STARTS as u64 {
            let i = (newest.wrapping_sub(k) % STARTS as u64) as usize;
            let Some(t) = s.starts.get(i) else { break };
            if t.ts == 0 || now.wrapping_sub(t.ts) > START_WINDOW_NS {
                continue;
            }
            if typed_only() && (t.rearm != 0) != (pass == 1) {
                continue;
            }
            if let Some(sub) = birth_substate(c, sport, t.timer) {
                found = Some((i, sub));
                break;
            }
        }
    }
    let Some((i, substate)) = found else {
        bump(counter::CLOSE_WITHOUT_TW);
        if debugging() {
            debug!(
                &(),
                "{} -> CLOSE without a TIME_WAIT timer (reset, abort or overflow): port {}",
                c.old,
                c.dport()
            );
        }
        return;
    };
    let Some(t) = s.starts.get_mut(i) else { return };
    t.ts = 0;
    let (timer, timeout) = (t.timer, t.timeout);
    let (skaddr, family) = (c.sk, c.family());
    emit!(SockEvent, |e| {
        let (rl, fl) = recorded_owner(skaddr, &mut e.owner);
        e.header = header(kind::TW_BIRTH, family, fl | flags::HAS_TUPLE);
        c.tuple(sport, &mut e.tuple);
        e.skaddr = skaddr;
        e.timer = timer;
        e.timeout_jiffies = timeout as u32;
        e.old_state = c.old;
        e.new_state = st::CLOSE;
        e.role = rl;
        e.substate = substate;
    });
}

/// Forgets a start whose timer was cancelled (its timewait socket is dead, or re-armed: the
/// re-arm records itself again).
#[inline(always)]
fn forget_start(s: &mut CpuScratch, timer: u64) {
    for i in 0..STARTS {
        if let Some(t) = s.starts.get_mut(i)
            && t.timer == timer
        {
            t.ts = 0;
        }
    }
}

/// Whether the timewait socket behind `timer` is this socket's, and its substate: TIME_WAIT,
/// or FIN_WAIT2 while the peer has not sent its FIN (tcp_time_wait's `state`). None: another
/// socket's.
#[inline(always)]
fn birth_substate(c: &Socket, sport: u16, timer: u64) -> Option<u8> {
    if typed_only() {
        // The timewait socket cannot be read: the order of events on this CPU is the join
        // (tcp_time_wait arms the timer, then tcp_done closes the full socket), and the
        // substate is left to userspace (0: unknown).
        return Some(0);
    }
    let tw = timer - config!(off_tw_timer) as u64;
    let head = read_skc(tw)?;
    let dport = c.dport();
    let family = c.family();
    let same = head.family == family as u16
        && head.num == sport
        && u16::from_be(head.dport_be) == dport
        && (family != AF_INET || (head.rcv_saddr, head.daddr) == c.v4());
    if !same {
        if debugging() {
            debug!(
                &(),
                "TIME_WAIT timer {:x} started, then a CLOSE of another socket: ports {}/{} vs {}/{}",
                timer,
                head.num,
                u16::from_be(head.dport_be),
                sport,
                dport
            );
        }
        return None;
    }
    kread(tw + config!(off_tw_substate) as u64, st::TIME_WAIT).or(Some(0))
}

/// `SYN_SENT -> CLOSE`: a connect() that never connected. Rare, so its cost does not matter;
/// the event names who called connect() (recorded then), where, and the error.
#[inline(always)]
fn on_connect_failed(c: &Socket) {
    bump(counter::CONNECT_FAILED);
    // SAFETY: `sk` is the tracepoint's typed `struct sock *`; `sk_err` is inside it (BTF).
    let err = sk_field::<i32>(c.sk as *const u8, config!(off_sk_err) as usize);
    let skaddr = c.sk;
    let family = c.family();
    emit!(SockEvent, |e| {
        let (rl, fl) = recorded_owner(skaddr, &mut e.owner);
        e.header = header(kind::CONNECT_FAIL, family, fl | flags::HAS_TUPLE);
        // No local port when none could be found (the failure path resets nothing else).
        c.tuple(c.sport(), &mut e.tuple);
        e.skaddr = skaddr;
        e.old_state = st::SYN_SENT;
        e.new_state = st::CLOSE;
        e.role = rl;
        e.err = err as u32;
    });
}

// ---------------------------------------------------------------------------------------------
// timer:* as BTF tracepoints. They fire for every timer of the system, so each loads the
// timer's function first (a direct load, no helper call) and returns at once for all others.
// Not classic: a classic tracepoint builds its whole trace record before the program runs, and
// all classic and kprobe programs of a CPU share one recursion guard, so a timer started by an
// interrupt while any of them runs would be skipped (and counted in recursion_misses). A BTF
// tracepoint hands over the typed `struct timer_list *` and guards each program on its own.

/// `timer->function`, read from the timer_list (offset from BTF).
#[inline(always)]
fn timer_function(timer: *const u8) -> u64 {
    // SAFETY: a BTF tracepoint's argument is a typed kernel pointer the verifier lets the
    // program load from directly (no helper call) at the BTF offset of a member; the offset
    // comes from frozen read-only data, which the verifier sees as a constant.
    unsafe {
        core::ptr::read_volatile(
            timer
                .add(config!(off_timer_function) as usize)
                .cast::<u64>(),
        )
    }
}

/// `timer_start(struct timer_list *timer, unsigned long bucket_expiry)`.
#[btf_tracepoint(function = "timer_start")]
pub fn timer_start(ctx: BtfTracePointContext) -> i32 {
    let timer: *const u8 = ctx.arg(0);
    let function = timer_function(timer);
    if function == config!(tw_timer_fn) {
        on_tw_start(timer as u64);
    } else if function == config!(reqsk_timer_fn) {
        on_reqsk_start(timer as u64);
    }
    0
}

fn on_tw_start(timer: u64) {
    let Some(s) = scratch() else { return };
    // enqueue_timer() runs after `expires` is set. A typed load from the tracepoint's timer.
    // SAFETY: as in timer_function.
    let expires = unsafe {
        core::ptr::read_volatile(
            (timer as *const u8)
                .add(config!(off_timer_expires) as usize)
                .cast::<u64>(),
        )
    };
    // SAFETY: helper without arguments.
    let timeout = expires.wrapping_sub(unsafe { bpf_jiffies64() });
    bump(counter::TW_TIMER_STARTS);
    if s.cancel_timer == timer {
        // mod_timer_pending() on a pending timer: detach (timer_cancel) then enqueue
        // (timer_start), under the timer base lock with interrupts off: nothing runs between.
        // tcp_timewait_state_process sets the substate to TIME_WAIT before it re-arms for the
        // peer's FIN (inet_twsk_reschedule), so the substate read now is the new one.
        // The 4-tuple too: a socket born before twtrace started is known by it alone.
        // (Not under typed_only: userspace knows the socket by its timer; any re-arm leaves it
        // in TIME_WAIT.)
        let tw = timer - config!(off_tw_timer) as u64;
        let substate = if typed_only() {
            0
        } else {
            kread(tw + config!(off_tw_substate) as u64, st::TIME_WAIT).unwrap_or(0)
        };
        let (known, h) = timer_skc(tw);
        emit!(TimerEvent, |e| {
            e.header = if known {
                skc_tuple(tw, &h, &mut e.tuple);
                e.tuple.netns = skc_netns(tw);
                header(kind::TW_REARM, h.family as u8, flags::HAS_TUPLE)
            } else {
                header(kind::TW_REARM, 0, 0)
            };
            e.timer = timer;
            e.timeout_jiffies = timeout as u32;
            e.substate = substate;
        });
    }
    let rearm = (s.cancel_timer == timer) as u64;
    s.cancel_timer = 0;
    // Also after a re-arm: a freed timewait socket's memory is reused at once, so a new birth
    // can follow the death of the old one at the same address; the 4-tuple check decides.
    let i = (s.next_start % STARTS as u64) as usize;
    s.next_start = s.next_start.wrapping_add(1);
    if let Some(slot) = s.starts.get_mut(i) {
        // A plain start never joined: a birth whose `-> CLOSE` did not come on this CPU.
        if slot.ts != 0 && slot.rearm == 0 {
            bump(counter::BIRTH_UNMATCHED);
        }
        *slot = TwStart {
            timer,
            timeout,
            // SAFETY: helper without arguments.
            ts: unsafe { bpf_ktime_get_ns() },
            rearm,
        };
    }
}

/// A listener arms a request socket's timer while handling a SYN. If the TIME_WAIT timer just
/// cancelled on this CPU had the same ports, that SYN took the TIME_WAIT 4-tuple over
/// (tcp_v4_rcv's TCP_TW_SYN path kills the timewait socket, then hands the SYN to the listener).
fn on_reqsk_start(timer: u64) {
    let Some(s) = scratch() else { return };
    let cancelled = s.cancel_timer;
    if cancelled == 0 {
        return;
    }
    s.cancel_timer = 0;
    if s.cancel_reuse != 0 {
        return;
    }
    // Under typed_only the request socket cannot be read: the order says it (a SYN handled
    // right after a timewait socket died on this CPU, not inside a connect()), and the task:
    // tcp_v4_rcv kills the timewait socket and arms the request socket's timer in one call,
    // so under one current task (a listener takes a SYN without the socket lock, never from
    // a backlog processed later by another task). A namespace's purge (inet_twsk_purge, in a kworker) followed
    // by some other connection's SYN on this CPU (loopback: in its sender's task) is not one.
    let same = if typed_only() {
        s.cancel_pid_tgid == bpf_get_current_pid_tgid()
    } else {
        read_skc(timer - config!(off_rsk_timer) as u64)
            .is_some_and(|head| portpair(&head) == s.cancel_portpair)
    };
    if same {
        emit!(TimerEvent, |e| {
            e.header = header(kind::TW_SYN, 0, 0);
            e.timer = cancelled;
        });
    }
}

/// `timer_cancel(struct timer_list *timer)`.
#[btf_tracepoint(function = "timer_cancel")]
pub fn timer_cancel(ctx: BtfTracePointContext) -> i32 {
    let timer: *const u8 = ctx.arg(0);
    if timer_function(timer) == config!(tw_timer_fn) {
        on_tw_cancel(timer as u64);
    }
    0
}

fn on_tw_cancel(timer: u64) {
    let Some(s) = scratch() else { return };
    if typed_only() {
        on_tw_cancel_typed(s, timer);
        return;
    }
    let tw = timer - config!(off_tw_timer) as u64;
    let Some(head) = read_skc(tw) else {
        if debugging() {
            debug!(
                &(),
                "a TIME_WAIT timer was cancelled, its socket unreadable"
            );
        }
        return;
    };
    let family = head.family as u8;
    // tcp_tw_reuse: __inet_hash_connect() kills the timewait socket inside the connect() that
    // just went CLOSE -> SYN_SENT towards the same destination. v4-mapped addresses compare as
    // IPv4 on either side (the connect's was made IPv4 when recorded).
    let reuse = s.connect_pid_tgid == bpf_get_current_pid_tgid()
        && s.connect_dport == u16::from_be(head.dport_be)
        // SAFETY: helper without arguments.
        && unsafe { bpf_ktime_get_ns() }.wrapping_sub(s.connect_ts) < REUSE_WINDOW_NS
        && (if family == AF_INET {
            s.connect_family == AF_INET as u16 && s.connect_daddr[..4] == head.daddr
        } else {
            let mut daddr = [0u8; 16];
            // SAFETY: as in skc_tuple.
            let _ = unsafe {
                bpf_probe_read_kernel_buf(
                    (tw + config!(off_skc_v6_daddr) as u64) as *const u8,
                    &mut daddr,
                )
            };
            if v4_mapped(&daddr) {
                s.connect_family == AF_INET as u16 && s.connect_daddr[..4] == daddr[12..]
            } else {
                s.connect_family == AF_INET6 as u16 && s.connect_daddr == daddr
            }
        });
    if reuse {
        s.connect_pid_tgid = 0;
    }
    emit!(TimerEvent, |e| {
        let fl = if reuse { flags::REUSE } else { 0 };
        e.header = header(kind::TW_CANCEL, family, fl | flags::HAS_TUPLE);
        e.timer = timer;
        skc_tuple(tw, &head, &mut e.tuple);
        e.tuple.netns = skc_netns(tw);
    });
    // A reuse is never a SYN take-over: the connect()'s own SYN, handled on this CPU right
    // after on loopback, must not be read as one. It can still turn out a re-arm: the
    // previous connection's timewait socket getting its peer's FIN on this CPU inside the
    // next connect() to the same destination looks like a reuse until its timer starts again
    // right after (seen on 6.1: a FIN_WAIT2-substate socket never became TIME_WAIT).
    s.cancel_timer = timer;
    s.cancel_reuse = reuse as u32;
    s.cancel_portpair = portpair(&head);
    forget_start(s, timer);
}

/// A cancel under `typed_only`: the socket behind the timer cannot be read, so the event
/// carries the timer alone (userspace knows its socket from the birth). Inside the connect() of
/// this task, right after its `CLOSE -> SYN_SENT`, it may be tcp_tw_reuse (__inet_hash_connect
/// kills the timewait socket it takes over) or, on loopback, that connect()'s own SYN killing a
/// TIME_WAIT of the listener's side in softirq: the event carries the connect()'s destination
/// and userspace, which knows the socket's remote end, tells them apart. A reqsk timer start
/// may follow either way (the SYN reaching the listener): the cancel stays pending for it.
#[inline(always)]
fn on_tw_cancel_typed(s: &mut CpuScratch, timer: u64) {
    let in_connect = s.connect_pid_tgid == bpf_get_current_pid_tgid()
        // SAFETY: helper without arguments.
        && unsafe { bpf_ktime_get_ns() }.wrapping_sub(s.connect_ts) < REUSE_WINDOW_NS;
    emit!(TimerEvent, |e| {
        e.timer = timer;
        if in_connect {
            e.header = header(kind::TW_CANCEL, s.connect_family as u8, flags::IN_CONNECT);
            e.tuple.daddr = s.connect_daddr;
            e.tuple.dport = s.connect_dport;
        } else {
            e.header = header(kind::TW_CANCEL, 0, 0);
        }
    });
    s.cancel_timer = timer;
    s.cancel_pid_tgid = bpf_get_current_pid_tgid();
    s.cancel_reuse = 0;
    forget_start(s, timer);
}

/// `timer_expire_entry(struct timer_list *timer, unsigned long baseclk)`: the timer is about to
/// run; `function` is still set in the struct.
#[btf_tracepoint(function = "timer_expire_entry")]
pub fn timer_expire_entry(ctx: BtfTracePointContext) -> i32 {
    let timer: *const u8 = ctx.arg(0);
    if timer_function(timer) == config!(tw_timer_fn) {
        on_tw_expire(timer as u64);
    }
    0
}

fn on_tw_expire(timer: u64) {
    if let Some(s) = scratch() {
        s.cancel_timer = 0;
    }
    let tw = timer - config!(off_tw_timer) as u64;
    let (known, h) = timer_skc(tw);
    emit!(TimerEvent, |e| {
        e.timer = timer;
        e.header = if known {
            skc_tuple(tw, &h, &mut e.tuple);
            e.tuple.netns = skc_netns(tw);
            header(kind::TW_EXPIRE, h.family as u8, flags::HAS_TUPLE)
        } else {
            header(kind::TW_EXPIRE, 0, 0)
        };
    });
}

// ---------------------------------------------------------------------------------------------
// The benchmark's floor (hidden `--hooks-only`): the same four hooks, programs that return at
// once. What entering a BPF program on each of these events costs before any work is done.

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn hook_state(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "timer_start")]
pub fn hook_timer_start(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "timer_cancel")]
pub fn hook_timer_cancel(_ctx: BtfTracePointContext) -> i32 {
    0
}

#[btf_tracepoint(function = "timer_expire_entry")]
pub fn hook_timer_expire(_ctx: BtfTracePointContext) -> i32 {
    0
}

// ---------------------------------------------------------------------------------------------
// sched:sched_process_fork (attached by `exec` only)

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`, as a BTF
/// tracepoint: no record layout to agree on (it changed in 6.x: `parent_comm` became a
/// `__data_loc` field) and no tracefs. The parent is the current task here (copy_process runs
/// in its context): a child of a tracked process joins the tree from the moment it exists,
/// before it can open a socket.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn sched_process_fork(ctx: BtfTracePointContext) -> i32 {
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if TRACKED.get_ptr(&parent).is_some() {
        let child: *const u8 = ctx.arg(1);
        // SAFETY: the typed `struct task_struct *` argument; `tgid` at its BTF offset.
        let tgid = unsafe {
            core::ptr::read_volatile(child.add(config!(off_task_tgid) as usize).cast::<i32>())
        };
        if TRACKED.insert(&(tgid as u32), &1, BPF_ANY as u64).is_err() {
            bump(counter::TRACK_FAILED);
            if debugging() {
                debug!(
                    &(),
                    "fork of {} into {} not tracked (map full)", parent, tgid
                );
            }
        }
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
