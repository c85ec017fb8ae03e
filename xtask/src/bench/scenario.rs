//! The scenarios: what each traced run attaches (twtrace's modes, the classic tools, two floors
//! that do no work), their names and what sets them apart, and the bpftrace programs two of
//! them run.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    Watch,
    Report,
    Serve,
    /// twtrace's floor: its hooks with programs that return at once (`--hooks-only`).
    Hooks,
    Tcpstates,
    Bpftrace,
    Floor,
    /// `twtrace serve` under refused connects (the loadgen's `--refused`): what the failed
    /// connect events cost.
    Refused,
}

impl Kind {
    pub(super) const ALL: [Kind; 8] = [
        Kind::Watch,
        Kind::Report,
        Kind::Serve,
        Kind::Refused,
        Kind::Hooks,
        Kind::Tcpstates,
        Kind::Bpftrace,
        Kind::Floor,
    ];

    pub(super) fn key(self) -> &'static str {
        match self {
            Kind::Watch => "watch",
            Kind::Report => "report",
            Kind::Serve => "serve",
            Kind::Hooks => "hooks",
            Kind::Tcpstates => "tcpstates",
            Kind::Bpftrace => "bpftrace",
            Kind::Floor => "floor",
            Kind::Refused => "refused",
        }
    }

    pub(super) fn label(self) -> &'static str {
        match self {
            Kind::Watch => "twtrace watch",
            Kind::Report => "twtrace report",
            Kind::Serve => "twtrace serve",
            Kind::Hooks => "floor: twtrace hooks",
            Kind::Tcpstates => "tcpstates (libbpf)",
            Kind::Bpftrace => "bpftrace count",
            Kind::Floor => "floor: classic tps",
            Kind::Refused => "serve, refused conn.",
        }
    }

    /// twtrace tracing: the targets apply.
    pub(super) fn twtrace(self) -> bool {
        matches!(self, Kind::Watch | Kind::Report | Kind::Serve)
    }

    /// Runs the twtrace binary (and reads its `--stats-json`).
    pub(super) fn runs_twtrace(self) -> bool {
        self.twtrace() || matches!(self, Kind::Hooks | Kind::Refused)
    }

    /// A tracer that does work: its own CPU per connection is reported as a share of an
    /// untraced connection's (the floors are what that share is measured over).
    pub(super) fn has_share(self) -> bool {
        !self.floor()
    }

    /// The load: refused connects rather than connections that leave a TIME_WAIT.
    pub(super) fn refused(self) -> bool {
        self == Kind::Refused
    }

    /// A floor: programs on twtrace's events that do no work.
    pub(super) fn floor(self) -> bool {
        matches!(self, Kind::Hooks | Kind::Floor)
    }

    pub(super) fn bpftrace(self) -> bool {
        matches!(self, Kind::Bpftrace | Kind::Floor)
    }
}

pub(super) const BPFTRACE_PROG: &str =
    "tracepoint:sock:inet_sock_set_state { @states[args->newstate] = count(); }";

/// The classic floor: bpftrace programs whose filters never match, on the classic tracepoints of
/// the same four events (bpftrace 0.17 cannot attach BTF tracepoints, as twtrace does; `hooks`
/// is that floor). What attaching classic programs there costs before any program works.
pub(super) const FLOOR_PROG: &str = "\
tracepoint:timer:timer_start /args->expires == 1/ { @a = count(); }
tracepoint:timer:timer_cancel /args->timer == 0/ { @b = count(); }
tracepoint:timer:timer_expire_entry /args->timer == 0/ { @c = count(); }
tracepoint:sock:inet_sock_set_state /args->newstate == 99/ { @d = count(); }";
