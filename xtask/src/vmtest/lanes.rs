//! The kernels vm-test boots, in one place: each series and the Debian suite whose signed cloud
//! kernel it is, and the lanes of the matrix (a series, booted with or without lockdown).

use std::fmt;

/// A kernel series: the newest signed `cloud-amd64` kernel of one Debian suite.
#[derive(Debug, PartialEq, Eq)]
pub struct Series {
    /// What `--kernel` takes and the matrix shows.
    pub name: &'static str,
    /// The Debian suite, fetched from deb.debian.org.
    pub suite: &'static str,
    /// Its security suite (debian-security), which carries the newest kernel of a stable
    /// release; unstable has none.
    pub security: Option<&'static str>,
    /// A moving target (unstable): tried and shown, but when it cannot be fetched or does not
    /// boot the run still passes; once it boots, its test results count like any other.
    pub optional: bool,
}

/// The metapackage that depends on the current kernel of a suite. Its `Depends` names the
/// versioned image, `linux-image-<abi>-cloud-amd64`: the signed one (the unsigned build is
/// `...-unsigned`, and the archive drops old unsigned versions: bullseye-security's unsigned
/// 5.10.262 is a 404). Signed matters: under lockdown only signed modules load.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";
/// The prefix of the versioned image package the metapackage depends on.
pub const IMAGE_PREFIX: &str = "linux-image-";

pub const SERIES: [Series; 4] = [
    Series {
        name: "5.10",
        suite: "bullseye",
        security: Some("bullseye-security"),
        optional: false,
    },
    Series {
        name: "6.1",
        suite: "bookworm",
        security: Some("bookworm-security"),
        optional: false,
    },
    // 6.12 is after "net: tcp: un-pin the tw_timer" (6.10): the TIME_WAIT timer is armed under
    // the ehash lock and may expire on another CPU. 6.1 is before it: keep both.
    Series {
        name: "6.12",
        suite: "trixie",
        security: Some("trixie-security"),
        optional: false,
    },
    Series {
        name: "sid",
        suite: "sid",
        security: None,
        optional: true,
    },
];

/// `lockdown=` on the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lockdown {
    /// What Secure Boot gives on Debian: no unsigned modules, no kernel writes.
    Integrity,
    /// Also no kernel reads: no `bpf_probe_read*` helpers in tracing programs, tracefs empty.
    Confidentiality,
}

impl Lockdown {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "integrity" => Ok(Lockdown::Integrity),
            "confidentiality" => Ok(Lockdown::Confidentiality),
            _ => Err(format!(
                "--lockdown takes integrity or confidentiality, not '{s}'"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Lockdown::Integrity => "integrity",
            Lockdown::Confidentiality => "confidentiality",
        }
    }
}

/// Tests that do not run in any guest: (executable, test or "" for all of it, why). Each
/// checks files of the source tree or drives tools that are the host's business, or needs a
/// debug build; none is a kernel's (`suite::plan` leaves them out, the matrix lists them).
/// Everything else runs, so that a test that is the kernel's business cannot be left out by
/// accident.
pub const EXCLUDED: [(&str, &str, &str); 18] = [
    (
        "workflow",
        "",
        "parses .github/workflows/ci.yml of the source tree with python3 and PyYAML; loads nothing",
    ),
    (
        "deploy_docker",
        "",
        "checks deploy/ files of the source tree (Dockerfile); loads nothing",
    ),
    (
        "deploy_grafana",
        "",
        "checks deploy/grafana/twtrace.json of the source tree against docs/metrics.md; loads \
         nothing",
    ),
    (
        "deploy_kubernetes",
        "",
        "checks deploy/ files of the source tree with python3-kubernetes; loads nothing",
    ),
    (
        "deploy_prometheus",
        "",
        "checks deploy/ files of the source tree with promtool; loads nothing",
    ),
    (
        "deploy_readme",
        "",
        "checks the README of the source tree; loads nothing",
    ),
    (
        "deploy_systemd",
        "",
        "checks deploy/ files of the source tree with systemd-analyze; loads nothing",
    ),
    (
        "dist_docs",
        "",
        "compares the man pages and completions committed in deploy/ with the CLI, renders them \
         with man, parses them with bash; loads nothing",
    ),
    (
        "version",
        "",
        "compares `twtrace --version` with `git rev-parse` in the source tree; loads nothing \
         (the guests' matrix names the version it ran)",
    ),
    (
        "dist_deb",
        "",
        "lintian, and dpkg into a Debian root made by mmdebstrap, in a chroot: the host's \
         packaging tools; the binary the package installs is the one the guests run",
    ),
    (
        "dist_image",
        "",
        "podman (and runc or crun) running the OCI image: the host's container engine; the \
         binary the image holds is the one the guests run",
    ),
    (
        "cli_ux",
        "exit_codes_are_documented_in_help_and_readme",
        "compares `twtrace --help` with README.md of the source tree; loads nothing",
    ),
    (
        "serve_ux",
        "series_follow_the_busiest_and_the_alert_fires_for_a_destination_busy_late",
        "evaluates deploy/prometheus/alerts.yml of the source tree against serve's series; \
         serve's series under traffic run in serve_ux's and reliability's other tests",
    ),
    (
        "signals",
        "exec_does_not_double_a_terminal_s_ctrl_c",
        "its command is a python3 script counting SIGINTs (the guest has no python3); exec \
         passing signals on runs in signals' other tests",
    ),
    (
        "dashboard",
        "",
        "drives a real Prometheus server (a Go program of 100 MB and more) against serve; serve \
         under load, its metrics and its API run in reliability::serve_survives_overload_and_recovers",
    ),
    (
        "serve",
        "prometheus_scrapes_the_births_of_our_peer_and_the_daemon_runs_unprivileged",
        "drives a real Prometheus server and promtool (Go programs of 100 MB and more); serve \
         under load, its metrics and its API run in reliability::serve_survives_overload_and_recovers",
    ),
    (
        "lockdown",
        "a_refused_probe_read_loads_the_typed_only_programs",
        "its refusal is injected (TWTRACE_TEST_REFUSE_PROBE_READ) in debug builds only and the \
         guests run the static binary that ships; the confidentiality lane meets the kernel's \
         own refusal wherever a test runs twtrace through ip netns exec",
    ),
    (
        "reliability",
        "nothing_left_in_the_kernel_after_any_end",
        "its failure injection (TWTRACE_TEST_PANIC, TWTRACE_TEST_FAIL_ATTACH) exists in debug \
         builds only and the guests run the static binary that ships; SIGTERM detaching \
         everything runs in watch::sigterm_detaches_everything",
    ),
];

/// One column of the matrix: a kernel series booted one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    pub series: &'static Series,
    pub lockdown: Option<Lockdown>,
}

impl fmt::Display for Lane {
    /// `6.1`, `6.1+integrity`: also the name of its log files.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.lockdown {
            None => f.write_str(self.series.name),
            Some(l) => write!(f, "{}+{}", self.series.name, l.name()),
        }
    }
}

/// The full matrix, in the order of its columns: both sides of the timer change first, then the
/// oldest kernel, the lockdown modes, and unstable.
const MATRIX: [(&str, Option<Lockdown>); 6] = [
    ("6.1", None),
    ("6.12", None),
    ("5.10", None),
    ("6.1", Some(Lockdown::Integrity)),
    ("6.1", Some(Lockdown::Confidentiality)),
    ("sid", None),
];

pub fn series(name: &str) -> Result<&'static Series, String> {
    SERIES.iter().find(|s| s.name == name).ok_or_else(|| {
        let known: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
        format!(
            "unknown kernel '{name}': --kernel takes {}",
            known.join(", ")
        )
    })
}

/// The lanes to run: the whole matrix by default; `--kernel` alone the listed series as they
/// are (or a lane by its name: `6.1+integrity`); `--lockdown` alone the matrix's lanes with that mode; both, each listed series with it.
pub fn select(kernels: &[String], lockdown: Option<Lockdown>) -> Result<Vec<Lane>, String> {
    let lanes: Vec<Lane> = if kernels.is_empty() {
        MATRIX
            .iter()
            .filter(|(_, l)| lockdown.is_none() || *l == lockdown)
            .map(|(s, l)| {
                Ok(Lane {
                    series: series(s)?,
                    lockdown: *l,
                })
            })
            .collect::<Result<_, String>>()?
    } else {
        kernels
            .iter()
            .map(|k| {
                // A lane as the matrix names it, `6.1+confidentiality`, carries its own mode.
                let (name, own) = match k.split_once('+') {
                    Some((name, mode)) => (name, Some(Lockdown::parse(mode)?)),
                    None => (k.as_str(), None),
                };
                if own.is_some() && lockdown.is_some() && own != lockdown {
                    return Err(format!("--kernel {k} and --lockdown disagree"));
                }
                Ok(Lane {
                    series: series(name)?,
                    lockdown: own.or(lockdown),
                })
            })
            .collect::<Result<_, String>>()?
    };
    let mut unique: Vec<Lane> = Vec::new();
    for l in lanes {
        if !unique.contains(&l) {
            unique.push(l);
        }
    }
    Ok(unique)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strings;

    fn names(lanes: &[Lane]) -> Vec<String> {
        lanes.iter().map(Lane::to_string).collect()
    }

    #[test]
    fn the_default_is_the_whole_matrix() {
        assert_eq!(
            names(&select(&[], None).unwrap()),
            [
                "6.1",
                "6.12",
                "5.10",
                "6.1+integrity",
                "6.1+confidentiality",
                "sid"
            ]
        );
    }

    #[test]
    fn kernels_and_lockdown_combine() {
        let k = strings(&["6.1", "6.12", "6.1"]);
        assert_eq!(names(&select(&k, None).unwrap()), ["6.1", "6.12"]);
        assert_eq!(
            names(&select(&k, Some(Lockdown::Integrity)).unwrap()),
            ["6.1+integrity", "6.12+integrity"]
        );
        assert_eq!(
            names(&select(&[], Some(Lockdown::Confidentiality)).unwrap()),
            ["6.1+confidentiality"]
        );
    }

    #[test]
    fn unknown_names_are_refused() {
        let e = select(&strings(&["4.19"]), None).unwrap_err();
        assert!(
            e.contains("'4.19'") && e.contains("5.10, 6.1, 6.12, sid"),
            "{e}"
        );
        assert!(Lockdown::parse("none").is_err());
    }

    #[test]
    fn a_kernel_may_name_a_lane_with_its_lockdown() {
        let k = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let lanes = select(&k(&["5.10", "6.1+confidentiality", "6.1"]), None).unwrap();
        let names: Vec<String> = lanes.iter().map(Lane::to_string).collect();
        assert_eq!(names, ["5.10", "6.1+confidentiality", "6.1"]);
        assert!(select(&k(&["6.1+integrity"]), Some(Lockdown::Confidentiality)).is_err());
        assert!(select(&k(&["6.1+none"]), None).is_err());
    }

    #[test]
    fn every_matrix_lane_names_a_known_series() {
        for (s, _) in MATRIX {
            series(s).unwrap();
        }
    }
}
