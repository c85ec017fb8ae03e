//! Results: the guest's tests port parsed (its sentinel lines and libtest's own), one column per
//! lane, one row per test, and the renderings: a table on the terminal with the failures'
//! output, and markdown for target/vm-test/matrix.md and the README's "Tested kernels".

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use super::{
    qemu::{kernel_problems, Boot, End},
    suite::{Left, Plan},
};

/// One line of the guest's tests port (the sentinels are written by guest-init.sh).
#[derive(Debug, PartialEq)]
pub enum Line<'a> {
    Start {
        release: &'a str,
    },
    Info(&'a str),
    Begin {
        exe: &'a str,
    },
    /// `test NAME ... ok`: libtest's line for one test.
    Test {
        name: &'a str,
        status: Status,
    },
    /// `test NAME ... ` with nothing after it: it was running when its executable ended.
    Running {
        name: &'a str,
    },
    Stderr {
        exe: &'a str,
    },
    End {
        exe: &'a str,
        rc: Option<i32>,
        uptime: Option<f64>,
    },
    Done,
    Other(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Failed,
    Ignored,
}

pub fn classify(line: &str) -> Line<'_> {
    let word = |prefix: &str| line.strip_prefix(prefix);
    fn first(s: &str) -> &str {
        s.split_whitespace().next().unwrap_or("")
    }
    let field = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_owned)
    };
    if let Some(rest) = word("VMTEST-START ") {
        Line::Start {
            release: first(rest),
        }
    } else if let Some(rest) = word("VMTEST-INFO ") {
        Line::Info(rest)
    } else if let Some(rest) = word("VMTEST-BEGIN ") {
        Line::Begin { exe: first(rest) }
    } else if let Some(rest) = word("VMTEST-STDERR ") {
        Line::Stderr { exe: first(rest) }
    } else if let Some(rest) = word("VMTEST-END ") {
        Line::End {
            exe: first(rest),
            rc: field("rc=").and_then(|v| v.parse().ok()),
            uptime: field("uptime=").and_then(|v| v.parse().ok()),
        }
    } else if line.starts_with("VMTEST-DONE") {
        Line::Done
    } else if let Some((name, result)) = word("test ").and_then(|r| r.split_once(" ... ")) {
        let status = match result.trim() {
            "ok" => Status::Ok,
            "FAILED" => Status::Failed,
            "" => return Line::Running { name },
            r if r.starts_with("ignored") => Status::Ignored,
            _ => return Line::Other(line),
        };
        Line::Test { name, status }
    } else if let Some(name) = word("test ").and_then(|r| r.strip_suffix(" ...")) {
        Line::Running { name }
    } else {
        Line::Other(line)
    }
}

/// One test executable's part of the tests port.
#[derive(Debug, Default)]
struct ExeLog {
    results: BTreeMap<String, Status>,
    running: Option<String>,
    /// libtest's output (failures' captured output among it), then its children's stderr.
    output: Vec<String>,
    stderr: Vec<String>,
    rc: Option<i32>,
    seconds: Option<f64>,
    ended: bool,
}

/// The tests port of one guest, parsed.
#[derive(Debug, Default)]
struct GuestLog {
    release: Option<String>,
    info: Vec<String>,
    exes: BTreeMap<String, ExeLog>,
    done: bool,
}

fn parse_guest(text: &str) -> GuestLog {
    let mut g = GuestLog::default();
    let mut current: Option<String> = None;
    let mut in_stderr = false;
    let mut begun_at: Option<f64> = None;
    for line in text.lines() {
        match classify(line) {
            Line::Start { release } => g.release = Some(release.to_owned()),
            Line::Info(i) => g.info.push(i.to_owned()),
            Line::Begin { exe } => {
                current = Some(exe.to_owned());
                in_stderr = false;
                begun_at = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("uptime="))
                    .and_then(|v| v.parse().ok());
                g.exes.insert(exe.to_owned(), ExeLog::default());
            }
            Line::Stderr { .. } => in_stderr = true,
            Line::End { exe, rc, uptime } => {
                if let Some(e) = g.exes.get_mut(exe) {
                    e.rc = rc;
                    e.ended = true;
                    e.seconds = uptime.zip(begun_at).map(|(end, begin)| end - begin);
                }
                current = None;
            }
            Line::Done => g.done = true,
            other => {
                let Some(e) = current.as_ref().and_then(|c| g.exes.get_mut(c)) else {
                    continue;
                };
                if in_stderr {
                    e.stderr.push(line.to_owned());
                    continue;
                }
                match other {
                    Line::Test { name, status } => {
                        e.results.insert(name.to_owned(), status);
                        e.running = None;
                    }
                    Line::Running { name } => e.running = Some(name.to_owned()),
                    _ => {}
                }
                e.output.push(line.to_owned());
            }
        }
    }
    g
}

/// What a failed test printed: libtest's `---- NAME stdout ----` block from the panic on
/// (`thread '...' panicked at FILE:LINE:` and the message), at most `MAX_EXCERPT` lines.
fn failure_excerpt(output: &[String], test: &str) -> Vec<String> {
    const MAX_EXCERPT: usize = 12;
    let header = format!("---- {test} stdout ----");
    let Some(start) = output.iter().position(|l| *l == header) else {
        return Vec::new();
    };
    let block: Vec<&String> = output[start + 1..]
        .iter()
        .take_while(|l| !l.starts_with("---- ") && *l != "failures:")
        .collect();
    let from = block
        .iter()
        .position(|l| l.contains("panicked at"))
        .unwrap_or(0);
    block[from..]
        .iter()
        .filter(|l| !l.starts_with("note: run with `RUST_BACKTRACE=1`"))
        .map(|l| l.trim_end().to_owned())
        .take(MAX_EXCERPT)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .skip_while(|l| l.is_empty())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

/// The message of an excerpt in one line: where it panicked and what it said first.
fn headline(excerpt: &[String]) -> String {
    let mut lines = excerpt.iter().map(|l| l.trim()).filter(|l| !l.is_empty());
    match lines.next() {
        Some(first) if first.contains("panicked at") => {
            let at = first
                .split("panicked at ")
                .nth(1)
                .unwrap_or("")
                .trim_end_matches(':');
            match lines.next() {
                Some(msg) => format!("{msg} ({at})"),
                None => first.to_owned(),
            }
        }
        Some(first) => first.to_owned(),
        None => "failed, without output".into(),
    }
}

/// One cell of the matrix.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Pass,
    /// The failure's output (first lines), or why the test did not run.
    Fail(Vec<String>),
    Ignored,
    /// The lane did not run at all (an optional lane that could not be fetched or booted).
    Absent,
}

/// Rows about the guest itself, before the tests.
pub const GUEST_ROWS: [&str; 3] = [
    "guest: boot",
    "guest: ran every test executable",
    "guest: kernel health (no lockup, stall, BUG, oops, warning, panic)",
];

/// One column.
#[derive(Debug)]
pub struct Column {
    pub lane: String,
    /// The kernel package and version, and `uname -r` in the guest.
    pub kernel: String,
    /// Accelerator and wall time from qemu's start to its end.
    pub how: String,
    /// Runs that fail still do not fail vm-test: an optional lane that could not be fetched
    /// or booted.
    pub counts: bool,
    pub cells: BTreeMap<String, Cell>,
    /// Seconds per test executable, as the guest measured them.
    pub seconds: Vec<(String, f64)>,
    pub info: Vec<String>,
}

impl Column {
    /// A lane that could not run at all: `why` in every cell (or absent, for an optional one).
    pub fn unavailable(lane: &str, rows: &[String], why: &str, optional: bool) -> Self {
        let cell = if optional {
            Cell::Absent
        } else {
            Cell::Fail(vec![why.to_owned()])
        };
        Column {
            lane: lane.to_owned(),
            kernel: format!("not run: {why}"),
            how: String::new(),
            counts: !optional,
            cells: GUEST_ROWS
                .iter()
                .map(|r| r.to_string())
                .chain(rows.iter().cloned())
                .map(|r| (r, cell.clone()))
                .collect(),
            seconds: Vec::new(),
            info: Vec::new(),
        }
    }

    /// The column of a lane that booted (or tried to).
    pub fn from_boot(lane: &str, kernel: &str, optional: bool, plan: &Plan, boot: &Boot) -> Self {
        let g = parse_guest(&boot.tests);
        let ended = match &boot.end {
            End::Exited if g.done => None,
            End::Exited => Some("qemu ended before the guest finished".to_owned()),
            End::Killed(why) => Some(format!("qemu killed: {why}")),
        };
        let console_tail = || -> Vec<String> {
            let lines: Vec<&str> = boot.console.lines().collect();
            lines[lines.len().saturating_sub(8)..]
                .iter()
                .map(|l| l.to_string())
                .collect()
        };
        let mut cells = BTreeMap::new();
        let booted = g.release.is_some();
        cells.insert(
            GUEST_ROWS[0].to_owned(),
            if booted {
                Cell::Pass
            } else {
                let mut why = vec![format!(
                    "the guest never reached its tests ({})",
                    ended.clone().unwrap_or_default()
                )];
                why.extend(console_tail());
                Cell::Fail(why)
            },
        );
        cells.insert(
            GUEST_ROWS[1].to_owned(),
            match &ended {
                None => Cell::Pass,
                Some(why) => Cell::Fail(vec![why.clone()]),
            },
        );
        let problems = kernel_problems(&boot.console);
        cells.insert(
            GUEST_ROWS[2].to_owned(),
            match problems.first() {
                None => Cell::Pass,
                Some(p) => Cell::Fail(p.lines().map(str::to_owned).collect()),
            },
        );
        for (exe, tests) in &plan.runs {
            let log = g.exes.get(exe);
            for test in tests {
                let cell = match log {
                    Some(l) => match l.results.get(test) {
                        Some(Status::Ok) => Cell::Pass,
                        Some(Status::Ignored) => Cell::Ignored,
                        Some(Status::Failed) => {
                            let excerpt = failure_excerpt(&l.output, test);
                            Cell::Fail(if excerpt.is_empty() {
                                vec!["FAILED, without output".to_owned()]
                            } else {
                                excerpt
                            })
                        }
                        None => Cell::Fail(vec![not_run(l, test, ended.as_deref())]),
                    },
                    None => Cell::Fail(vec![format!(
                        "not run: {}",
                        ended.as_deref().unwrap_or("its executable never began")
                    )]),
                };
                cells.insert(format!("{exe}::{test}"), cell);
            }
        }
        Column {
            lane: lane.to_owned(),
            kernel: match &g.release {
                Some(r) if !kernel.contains(r.as_str()) => format!("{kernel} (uname -r {r})"),
                _ => kernel.to_owned(),
            },
            how: String::new(),
            counts: !optional || booted,
            cells,
            seconds: g
                .exes
                .iter()
                .filter_map(|(n, e)| e.seconds.map(|s| (n.clone(), s)))
                .collect(),
            info: g.info,
        }
    }

    fn failed(&self) -> bool {
        self.counts && self.cells.values().any(|c| matches!(c, Cell::Fail(_)))
    }
}

/// Why a planned test has no result line in its executable's part.
fn not_run(log: &ExeLog, test: &str, ended: Option<&str>) -> String {
    let rc = log.rc.map_or("?".to_owned(), |r| r.to_string());
    match (&log.running, log.ended) {
        (Some(r), true) if r == test && log.rc == Some(137) => format!(
            "killed by the guest's time limit for one executable ({}) while it ran",
            minutes(super::suite::EXECUTABLE_LIMIT)
        ),
        (Some(r), true) if r == test => {
            format!("its executable ended while it ran (exit code {rc})")
        }
        (Some(r), false) if r == test => format!(
            "running when the guest ended: {}",
            ended.unwrap_or("no end sentinel")
        ),
        (_, true) => format!("no result: its executable ended first (exit code {rc})"),
        (_, false) => format!("not run: {}", ended.unwrap_or("no end sentinel")),
    }
}

/// The whole run.
pub struct Matrix {
    /// What twtrace ran in the guests (its `--version` and where it came from).
    pub tested: String,
    pub rows: Vec<String>,
    pub columns: Vec<Column>,
    /// Tests not run in the guest, and why.
    pub left: Vec<Left>,
}

fn short(cell: Option<&Cell>) -> &'static str {
    match cell {
        Some(Cell::Pass) => "pass",
        Some(Cell::Fail(_)) => "FAIL",
        Some(Cell::Ignored) => "ignored",
        Some(Cell::Absent) | None => "-",
    }
}

/// What a failure comes down to, so that failures with one cause read as one: twtrace's own
/// error line when the test quotes it (`twtrace: the kernel refused to load program ...`),
/// whatever the test wrapped around it; else the test's headline.
fn cause(excerpt: &[String]) -> String {
    excerpt
        .iter()
        .filter(|l| !l.contains("events lost"))
        .find_map(|l| l.find("twtrace: ").map(|i| l[i..].trim().to_owned()))
        .unwrap_or_else(|| headline(excerpt))
}

/// Failures with one cause, across lanes: the (lane, row) cells and the first one's output.
struct Group<'a> {
    cause: String,
    cells: Vec<(&'a str, &'a str)>,
    excerpt: &'a [String],
}

impl Group<'_> {
    /// Where it failed: `row on 6.1, 6.12` for one test, else `6.1: row; 5.10: 8 tests`.
    fn place(&self, quote: &str) -> String {
        let (_, row) = self.cells[0];
        if self.cells.iter().all(|(_, r)| *r == row) {
            let lanes: Vec<&str> = self.cells.iter().map(|(l, _)| *l).collect();
            return format!("{quote}{row}{quote} on {}", lanes.join(", "));
        }
        let mut lanes: Vec<(&str, Vec<&str>)> = Vec::new();
        for (lane, row) in &self.cells {
            match lanes.iter_mut().find(|(l, _)| l == lane) {
                Some((_, rows)) => rows.push(row),
                None => lanes.push((lane, vec![row])),
            }
        }
        let parts: Vec<String> = lanes
            .iter()
            .map(|(lane, rows)| match rows.as_slice() {
                [one] => format!("{lane}: {quote}{one}{quote}"),
                many => format!("{lane}: {} tests", many.len()),
            })
            .collect();
        parts.join("; ")
    }
}

impl Matrix {
    fn all_rows(&self) -> impl Iterator<Item = &str> {
        GUEST_ROWS
            .iter()
            .copied()
            .chain(self.rows.iter().map(String::as_str))
    }

    pub fn failed(&self) -> bool {
        self.columns.iter().any(Column::failed)
    }

    fn groups(&self) -> Vec<Group<'_>> {
        let mut groups: Vec<Group> = Vec::new();
        for c in &self.columns {
            for row in self.all_rows() {
                let Some(Cell::Fail(excerpt)) = c.cells.get(row) else {
                    continue;
                };
                let cause = cause(excerpt);
                match groups.iter_mut().find(|g| g.cause == cause) {
                    Some(g) => g.cells.push((&c.lane, row)),
                    None => groups.push(Group {
                        cause,
                        cells: vec![(&c.lane, row)],
                        excerpt,
                    }),
                }
            }
        }
        groups
    }

    /// The table, the lanes, then each cause of failure with where it happened and the first
    /// failure's output.
    pub fn text(&self) -> String {
        let width = self.all_rows().map(str::len).max().unwrap_or(10);
        let cell = |c: &Column, s: &str| format!(" {s:<w$}", w = c.lane.len().max(7));
        let mut out = format!("twtrace: {}\n\n{:<width$}", self.tested, "");
        for c in &self.columns {
            out += &cell(c, &c.lane);
        }
        out.push('\n');
        for row in self.all_rows() {
            out += &format!("{row:<width$}");
            for c in &self.columns {
                out += &cell(c, short(c.cells.get(row)));
            }
            out.push('\n');
        }
        out += "\nlanes:\n";
        for c in &self.columns {
            let _ = writeln!(out, "  {}: {} {}", c.lane, c.kernel, c.how);
            for i in &c.info {
                let _ = writeln!(out, "      {i}");
            }
            if !c.seconds.is_empty() {
                let per: Vec<String> = c
                    .seconds
                    .iter()
                    .map(|(e, s)| format!("{e} {s:.0} s"))
                    .collect();
                let _ = writeln!(out, "      time per executable: {}", per.join(", "));
            }
        }
        let groups = self.groups();
        if !groups.is_empty() {
            out += "\nfailures, by cause:\n";
        }
        for g in &groups {
            let _ = writeln!(out, "{}", g.place(""));
            for l in g.excerpt {
                let _ = writeln!(out, "    {l}");
            }
        }
        if !self.left.is_empty() {
            out += "\nnot run in the guests:\n";
        }
        for l in &self.left {
            let _ = writeln!(out, "  {}: {}", l.what, l.why);
        }
        out
    }

    /// Markdown: the table (a failed cell names its cause's number), the lanes, the causes.
    pub fn markdown(&self, date: &str) -> String {
        let groups = self.groups();
        let note = |lane: &str, row: &str| {
            groups
                .iter()
                .position(|g| g.cells.contains(&(lane, row)))
                .map(|i| i + 1)
        };
        let mut out = format!(
            "Run of {date} (`cargo +stable xtask vm-test`: each kernel booted under qemu, the \
             integration tests run inside it) with {}.\n\n| test |",
            self.tested
        );
        for c in &self.columns {
            let _ = write!(out, " {} |", c.lane);
        }
        out += "\n|---|";
        out += &"---|".repeat(self.columns.len());
        out.push('\n');
        for row in self.all_rows() {
            let _ = write!(out, "| `{row}` |");
            for c in &self.columns {
                let cell = match (c.cells.get(row), note(&c.lane, row)) {
                    (Some(Cell::Fail(_)), Some(n)) => format!("**FAIL** ({n})"),
                    (cell, _) => short(cell).to_owned(),
                };
                let _ = write!(out, " {cell} |");
            }
            out.push('\n');
        }
        out += "\n";
        for c in &self.columns {
            let _ = writeln!(out, "* {}: {} {}", c.lane, c.kernel, c.how);
        }
        if !groups.is_empty() {
            out += "\nFailures, by cause:\n\n";
        }
        for (i, g) in groups.iter().enumerate() {
            let cause: String = g.cause.chars().take(300).collect();
            let _ = writeln!(
                out,
                "{}. `{}`: {}",
                i + 1,
                cause.replace('`', "'"),
                g.place("`")
            );
        }
        if !self.left.is_empty() {
            out += "\nNot run in the guests, for reasons that are not the kernel's:\n\n";
        }
        for l in &self.left {
            let _ = writeln!(out, "* `{}`: {}", l.what, l.why);
        }
        out
    }
}

/// Where the README's "Tested kernels" table goes, between these lines.
pub const README_BEGIN: &str =
    "<!-- vm-test: begin (written by `cargo +stable xtask vm-test --update-readme`) -->";
pub const README_END: &str = "<!-- vm-test: end -->";

/// The README with the text between the markers replaced by `block`.
pub fn replace_block(readme: &str, block: &str) -> Result<String, String> {
    let missing = || format!("README.md has no `{README_BEGIN}` ... `{README_END}` block");
    let begin = readme.find(README_BEGIN).ok_or_else(missing)?;
    let end = readme[begin..].find(README_END).ok_or_else(missing)? + begin;
    Ok(format!(
        "{}{README_BEGIN}\n{}\n{}",
        &readme[..begin],
        block.trim_end(),
        &readme[end..]
    ))
}

/// `8m12s`, `20m`, `41s`.
pub fn minutes(d: Duration) -> String {
    match (d.as_secs() / 60, d.as_secs() % 60) {
        (0, s) => format!("{s}s"),
        (m, 0) => format!("{m}m"),
        (m, s) => format!("{m}m{s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strings;

    const GUEST: &str = "\
VMTEST-START 6.1.0-57-cloud-amd64 uptime=3.41
VMTEST-INFO lockdown: [none] integrity confidentiality
VMTEST-INFO module inet_diag loaded
VMTEST-BEGIN watch uptime=3.60

running 3 tests
test ipv6_loopback_births ... ok
test server_closes_first_births_go_to_the_server ... FAILED
test sigterm_detaches_everything ... ignored

failures:

---- server_closes_first_births_go_to_the_server stdout ----

thread 'server_closes_first_births_go_to_the_server' panicked at tests/tests/watch.rs:170:5:
assertion `left == right` failed
  left: 6
 right: 7
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace


failures:
    server_closes_first_births_go_to_the_server

test result: FAILED. 1 passed; 1 failed; 1 ignored; 0 measured; 0 filtered out; finished in 9.50s

VMTEST-STDERR watch
Cannot remove namespace file \"/run/netns/twt-sc-1-1\": Device or resource busy
VMTEST-END watch rc=101 uptime=14.10
VMTEST-BEGIN reliability uptime=14.20

running 2 tests
test btf_missing ... ok
test overload_is_counted_exactly_and_reported ... 
VMTEST-END reliability rc=137 uptime=1214.2
VMTEST-DONE uptime=1215.0
";

    fn plan() -> Plan {
        Plan {
            runs: vec![
                (
                    "watch".into(),
                    strings(&[
                        "ipv6_loopback_births",
                        "server_closes_first_births_go_to_the_server",
                        "sigterm_detaches_everything",
                    ]),
                ),
                (
                    "reliability".into(),
                    strings(&["btf_missing", "overload_is_counted_exactly_and_reported"]),
                ),
                ("sockdiag".into(), strings(&["time_wait_dump_matches_ss"])),
            ],
            left: Vec::new(),
        }
    }

    fn boot(tests: &str, console: &str, end: End) -> Boot {
        Boot {
            console: console.into(),
            tests: tests.into(),
            wall: Duration::from_secs(1215),
            end,
        }
    }

    #[test]
    fn sentinels_and_libtest_lines() {
        assert_eq!(
            classify("VMTEST-END watch rc=101 uptime=14.10"),
            Line::End {
                exe: "watch",
                rc: Some(101),
                uptime: Some(14.10)
            }
        );
        assert_eq!(
            classify("test a_b ... ok"),
            Line::Test {
                name: "a_b",
                status: Status::Ok
            }
        );
        assert_eq!(
            classify("test a_b ... ignored, needs a NIC"),
            Line::Test {
                name: "a_b",
                status: Status::Ignored
            }
        );
        assert_eq!(classify("test a_b ... "), Line::Running { name: "a_b" });
        assert!(matches!(
            classify("test result: ok. 3 passed; 0 failed"),
            Line::Other(_)
        ));
    }

    #[test]
    fn a_lane_column_from_the_guests_output() {
        let c = Column::from_boot(
            "6.1",
            "linux-image-6.1.0-57-cloud-amd64 6.1.192-3",
            false,
            &plan(),
            &boot(GUEST, "[ 1.0] Linux version 6.1.0\n", End::Exited),
        );
        assert_eq!(c.cells["guest: boot"], Cell::Pass);
        assert_eq!(c.cells[GUEST_ROWS[1]], Cell::Pass);
        assert_eq!(c.cells[GUEST_ROWS[2]], Cell::Pass);
        assert_eq!(c.cells["watch::ipv6_loopback_births"], Cell::Pass);
        assert_eq!(c.cells["watch::sigterm_detaches_everything"], Cell::Ignored);
        let Cell::Fail(excerpt) = &c.cells["watch::server_closes_first_births_go_to_the_server"]
        else {
            panic!("a failure");
        };
        assert_eq!(
            excerpt,
            &[
                "thread 'server_closes_first_births_go_to_the_server' panicked at tests/tests/watch.rs:170:5:",
                "assertion `left == right` failed",
                "  left: 6",
                " right: 7"
            ]
        );
        assert_eq!(
            headline(excerpt),
            "assertion `left == right` failed (tests/tests/watch.rs:170:5)"
        );
        assert_eq!(c.cells["reliability::btf_missing"], Cell::Pass);
        let Cell::Fail(why) = &c.cells["reliability::overload_is_counted_exactly_and_reported"]
        else {
            panic!("killed");
        };
        assert!(why[0].contains("time limit"), "{why:?}");
        let Cell::Fail(why) = &c.cells["sockdiag::time_wait_dump_matches_ss"] else {
            panic!("never began");
        };
        assert!(why[0].contains("never began"), "{why:?}");
        assert_eq!(
            c.seconds,
            [("reliability".into(), 1200.0), ("watch".into(), 10.5)]
        );
        assert_eq!(c.kernel, "linux-image-6.1.0-57-cloud-amd64 6.1.192-3");
        assert!(c.failed());
    }

    #[test]
    fn a_panicking_guest_fails_its_health_and_the_tests_it_never_ran() {
        let tests = "VMTEST-START 5.10.0-46-cloud-amd64 uptime=4.0\nVMTEST-BEGIN watch uptime=4.1\n\nrunning 3 tests\ntest ipv6_loopback_births ... ";
        let console = "[ 60.0] vmtest: watch begins\n[ 90.0] watchdog: BUG: soft lockup - CPU#1 stuck for 22s! [twtrace:300]\n[ 90.1] Kernel panic - not syncing: softlockup: hung tasks\n";
        let c = Column::from_boot(
            "5.10",
            "k",
            false,
            &plan(),
            &boot(tests, console, End::Exited),
        );
        assert_eq!(c.cells["guest: boot"], Cell::Pass);
        let Cell::Fail(health) = &c.cells[GUEST_ROWS[2]] else {
            panic!("health");
        };
        assert_eq!(health[0], "(last marker: watch begins)");
        assert!(health[1].contains("soft lockup"));
        let Cell::Fail(why) = &c.cells["watch::ipv6_loopback_births"] else {
            panic!();
        };
        assert_eq!(
            why[0],
            "running when the guest ended: qemu ended before the guest finished"
        );
        let Cell::Fail(why) = &c.cells["reliability::btf_missing"] else {
            panic!();
        };
        assert_eq!(why[0], "not run: qemu ended before the guest finished");
    }

    #[test]
    fn an_optional_lane_that_did_not_boot_does_not_fail_the_run() {
        let rows = plan().rows();
        let sid = Column::unavailable("sid", &rows, "no linux-image-cloud-amd64", true);
        assert!(!sid.failed());
        let mut c = Column::from_boot(
            "sid",
            "k",
            true,
            &plan(),
            &boot("", "qemu: no kernel", End::Killed("x".into())),
        );
        assert!(!c.failed(), "never booted");
        c = Column::from_boot("sid", "k", true, &plan(), &boot(GUEST, "", End::Exited));
        assert!(c.failed(), "booted: its tests count");
    }

    #[test]
    fn renderings_group_alike_failures() {
        let p = plan();
        let m = Matrix {
            tested: "twtrace 0.1.0".into(),
            rows: p.rows(),
            columns: vec![
                Column::from_boot("6.1", "k61", false, &p, &boot(GUEST, "", End::Exited)),
                Column::unavailable("6.12", &p.rows(), "apt-get download failed", false),
            ],
            left: vec![Left {
                what: "workflow::w".into(),
                why: "python3",
            }],
        };
        let text = m.text();
        assert!(text.contains("watch::ipv6_loopback_births"), "{text}");
        let line = text
            .lines()
            .find(|l| l.starts_with("watch::ipv6_loopback_births"))
            .unwrap();
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>(),
            ["watch::ipv6_loopback_births", "pass", "FAIL"]
        );
        assert!(
            text.contains("\n6.12: 9 tests\n    apt-get download failed\n"),
            "{text}"
        );
        let md = m.markdown("2026-11-30");
        assert!(
            md.contains("| test | 6.1 | 6.12 |\n|---|---|---|\n"),
            "{md}"
        );
        assert!(
            md.contains("| `watch::ipv6_loopback_births` | pass | **FAIL** ("),
            "{md}"
        );
        assert!(
            md.contains("1. `assertion 'left == right' failed (tests/tests/watch.rs:170:5)`: `watch::server_closes_first_births_go_to_the_server` on 6.1\n"),
            "{md}"
        );
        assert!(
            md.contains("4. `apt-get download failed`: 6.12: 9 tests\n"),
            "{md}"
        );
        assert!(md.ends_with("* `workflow::w`: python3\n"), "{md}");
        assert!(text.ends_with("  workflow::w: python3\n"), "{text}");
    }

    #[test]
    fn one_test_failing_alike_on_several_lanes_is_one_cause() {
        let p = plan();
        let m = Matrix {
            tested: "twtrace 0.1.0".into(),
            rows: p.rows(),
            columns: ["6.1", "6.12"]
                .map(|l| Column::from_boot(l, "k", false, &p, &boot(GUEST, "", End::Exited)))
                .into(),
            left: Vec::new(),
        };
        let md = m.markdown("2026-11-30");
        assert!(
            md.contains("`: `watch::server_closes_first_births_go_to_the_server` on 6.1, 6.12\n"),
            "{md}"
        );
        assert!(md.contains("| **FAIL** (1) | **FAIL** (1) |"), "{md}");
    }

    #[test]
    fn a_cause_reads_the_same_whatever_the_test_wrapped_around_it() {
        let watch = strings(&[
            "thread 'a' panicked at tests/src/lib.rs:262:13:",
            "twtrace watch exited at start (exit status: 7): twtrace: the kernel refused to load program timer_expire_entry: denied",
        ]);
        let report = strings(&[
            "thread 'b' panicked at tests/tests/report.rs:19:5:",
            "report failed: twtrace: the kernel refused to load program timer_expire_entry: denied",
        ]);
        assert_eq!(cause(&watch), cause(&report));
        assert_eq!(
            cause(&watch),
            "twtrace: the kernel refused to load program timer_expire_entry: denied"
        );
        let lost = strings(&[
            "thread 'c' panicked at tests/tests/watch.rs:60:5:",
            "assertion `left == right` failed: twtrace: 3 events lost (ring buffer full: 3)",
        ]);
        assert_eq!(
            cause(&lost),
            "assertion `left == right` failed: twtrace: 3 events lost (ring buffer full: 3) (tests/tests/watch.rs:60:5)"
        );
    }

    #[test]
    fn the_readme_block_is_replaced_in_place() {
        let readme =
            format!("# t\n\n## Tested kernels\n\n{README_BEGIN}\nold\n{README_END}\n\nmore\n");
        let new = replace_block(&readme, "| a |\n").unwrap();
        assert_eq!(
            new,
            format!("# t\n\n## Tested kernels\n\n{README_BEGIN}\n| a |\n{README_END}\n\nmore\n")
        );
        assert!(replace_block("# t\n", "x").is_err());
        assert_eq!(minutes(Duration::from_secs(492)), "8m12s");
        assert_eq!(minutes(Duration::from_secs(1200)), "20m");
        assert_eq!(minutes(Duration::from_secs(41)), "41s");
    }
}
