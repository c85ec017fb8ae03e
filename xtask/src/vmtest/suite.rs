//! What runs in the guest: twtrace as it ships (the static binary of `dist`'s tarball), the
//! integration test executables as `xtask test` builds them (found through cargo's JSON
//! messages, their tests listed by themselves), minus those that cannot work there for reasons
//! that are not the kernel's, each with its reason.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use super::lanes::EXCLUDED;
use crate::{
    cargo, dist,
    json::Json,
    procs::{run_for, stdout_for},
    status, target_dir,
};

/// The guest kills a test executable that runs longer than this (the tests bound every wait
/// of their own; this catches a hang in the kernel or in a test's set-up).
pub const EXECUTABLE_LIMIT: Duration = Duration::from_secs(20 * 60);

/// Building the tests from scratch takes minutes on two cores; this is only the bound.
const BUILD_LIMIT: Duration = Duration::from_secs(3600);

/// One integration test executable (`tests/tests/<name>.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestExecutable {
    pub name: String,
    pub exe: PathBuf,
    /// Every test it has, as `--list` prints them.
    pub tests: Vec<String>,
}

/// What the guest runs.
#[derive(Debug)]
pub struct Build {
    /// The static binary, taken out of dist's tarball: what ships is what is tested.
    pub twtrace: PathBuf,
    /// That tarball.
    pub tarball: PathBuf,
    /// The tests' traffic generator and the tests, dev profile (what `xtask test` built).
    pub churn: PathBuf,
    pub tests: Vec<TestExecutable>,
}

/// Which tests to run: all but the excluded; with `--only`, those whose `executable::test`
/// contains one of the patterns.
#[derive(Debug, Default, Clone)]
pub struct Selection {
    pub only: Vec<String>,
    /// `--skip`: tests left out of this run (the matrix lists them as such).
    pub skip: Vec<String>,
}

/// Why a `--skip`ped test is not in the matrix.
pub const SKIPPED: &str = "left out of this run by --skip (CI's subset: DEVELOPERS.md)";

/// A test left out, and why (for the matrix's notes).
#[derive(Debug, PartialEq, Eq)]
pub struct Left {
    pub what: String,
    pub why: &'static str,
}

/// The plan: per executable, the tests to run (`executable::test` rows of the matrix), and
/// what was left out.
#[derive(Debug, Default)]
pub struct Plan {
    pub runs: Vec<(String, Vec<String>)>,
    pub left: Vec<Left>,
}

/// Takes twtrace from dist's tarball (built if target/packages does not hold this tree's),
/// into `dir`; builds twt-churn and the integration tests with the very commands `xtask test`
/// runs (so that after it, as in CI, cargo has nothing to do), one cargo at a time; and lists
/// each test executable's tests. Listing runs nothing: no program is loaded into this
/// machine's kernel.
pub fn build(dir: &Path) -> Result<Build, String> {
    let shipped = dist::current_or_build()?;
    let twtrace = dir.join("twtrace");
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    fs::write(&twtrace, dist::tarball_binary(&shipped.tarball)?)
        .and_then(|()| fs::set_permissions(&twtrace, fs::Permissions::from_mode(0o755)))
        .map_err(|e| format!("cannot write {}: {e}", twtrace.display()))?;
    status(&mut cargo(&[
        "build",
        "--package",
        "twtrace",
        "--package",
        "twtrace-tests",
    ]))?;
    let mut cmd = cargo(&["test", "--no-run", "--message-format=json"]);
    // cargo's progress on the terminal, its JSON messages read here.
    let messages = String::from_utf8_lossy(&stdout_for(&mut cmd, BUILD_LIMIT)?).into_owned();
    let mut tests = Vec::new();
    for (name, exe) in test_executables(&messages)? {
        let list = run_for(
            Command::new(&exe).args(["--list", "--format", "terse"]),
            Duration::from_secs(60),
        )?;
        tests.push(TestExecutable {
            name,
            exe,
            tests: parse_list(&list),
        });
    }
    Ok(Build {
        twtrace,
        tarball: shipped.tarball,
        churn: target_dir().join("debug/twt-churn"),
        tests,
    })
}

/// The integration tests' package (tests/Cargo.toml).
const TESTS_MANIFEST: &str = "tests/Cargo.toml";

/// (name, executable) of every integration test target of the tests' package in cargo's JSON
/// messages (which cover the whole workspace).
fn test_executables(messages: &str) -> Result<Vec<(String, PathBuf)>, String> {
    let mut out = Vec::new();
    for line in messages.lines().filter(|l| l.starts_with('{')) {
        let m = Json::parse(line).map_err(|e| format!("cargo printed bad JSON ({e}): {line}"))?;
        let ours = m
            .get("manifest_path")
            .and_then(Json::str)
            .is_some_and(|p| p.ends_with(TESTS_MANIFEST));
        let target = m.get("target");
        let kind = target.and_then(|t| t.get("kind")).map(Json::arr);
        let is_test = ours && kind.is_some_and(|k| k.len() == 1 && k[0].str() == Some("test"));
        let name = target.and_then(|t| t.get("name")).and_then(Json::str);
        let exe = m.get("executable").and_then(Json::str);
        if let (true, Some(name), Some(exe)) = (is_test, name, exe) {
            out.push((name.to_owned(), PathBuf::from(exe)));
        }
    }
    out.sort();
    out.dedup();
    if out.is_empty() {
        return Err("cargo test --no-run built no integration test executable".into());
    }
    Ok(out)
}

/// `NAME: test` lines of `--list --format terse`.
fn parse_list(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_owned)
        .collect()
}

/// The reason `table` gives for `exe::test`; `test` "" asks whether all of `exe` is listed.
fn listed(table: &[(&str, &str, &'static str)], exe: &str, test: &str) -> Option<&'static str> {
    table
        .iter()
        .find(|(e, t, _)| *e == exe && (t.is_empty() || *t == test))
        .map(|(_, _, why)| *why)
}

pub fn plan(tests: &[TestExecutable], sel: &Selection) -> Plan {
    let mut plan = Plan::default();
    for t in tests {
        if let Some(why) = listed(&EXCLUDED, &t.name, "").filter(|_| !t.tests.is_empty()) {
            let n = t.tests.len();
            let what = format!("{} ({n} test{})", t.name, if n == 1 { "" } else { "s" });
            plan.left.push(Left { what, why });
            continue;
        }
        let mut run = Vec::new();
        let mut skipped = Vec::new();
        for test in &t.tests {
            let what = format!("{}::{test}", t.name);
            if let Some(why) = listed(&EXCLUDED, &t.name, test) {
                plan.left.push(Left { what, why });
            } else if sel.skip.iter().any(|p| what.contains(p.as_str())) {
                skipped.push(what);
            } else if sel.only.is_empty() || sel.only.iter().any(|p| what.contains(p.as_str())) {
                run.push(test.clone());
            }
        }
        // A whole executable skipped is one line.
        if !skipped.is_empty() && skipped.len() == t.tests.len() {
            let n = skipped.len();
            let what = format!("{} ({n} test{})", t.name, if n == 1 { "" } else { "s" });
            plan.left.push(Left { what, why: SKIPPED });
        } else {
            for what in skipped {
                plan.left.push(Left { what, why: SKIPPED });
            }
        }
        if !run.is_empty() {
            plan.runs.push((t.name.clone(), run));
        }
    }
    plan
}

impl Plan {
    /// `/vmtest/plan`: one line per executable, `NAME LIMIT_S ARGS...` (guest-init.sh). One
    /// test at a time: output in order, and the tests that count the programs in the kernel
    /// take a lock of their own anyway. `--exact` with every test named: nothing else runs.
    pub fn guest_file(&self) -> String {
        self.runs
            .iter()
            .map(|(exe, tests)| {
                format!(
                    "{exe} {} --test-threads=1 --color=never --exact {}\n",
                    EXECUTABLE_LIMIT.as_secs(),
                    tests.join(" ")
                )
            })
            .collect()
    }

    /// The matrix's rows: `executable::test`, in plan order.
    pub fn rows(&self) -> Vec<String> {
        self.runs
            .iter()
            .flat_map(|(exe, tests)| tests.iter().map(move |t| format!("{exe}::{t}")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integration_tests_are_found_in_cargos_messages() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"twtrace_tests"},"executable":"/t/deps/twtrace_tests-1"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"twt-churn"},"executable":"/t/twt-churn"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","manifest_path":"/w/tests/Cargo.toml","target":{"kind":["test"],"name":"watch"},"profile":{"test":true},"executable":"/t/deps/watch-2e09"}"#,
            "\n",
            // Another package's integration test: not ours.
            r#"{"reason":"compiler-artifact","manifest_path":"/w/twtrace/Cargo.toml","target":{"kind":["test"],"name":"cli"},"profile":{"test":true},"executable":"/t/deps/cli-1"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"serde"},"executable":null}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
            "\n",
        );
        assert_eq!(
            test_executables(messages).unwrap(),
            [("watch".to_owned(), PathBuf::from("/t/deps/watch-2e09"))]
        );
        assert!(test_executables("").is_err());
    }

    #[test]
    fn list_output_gives_test_names() {
        let out = "a_new_syn: test\nipv6_loopback_births: test\n\n2 tests, 0 benchmarks\n";
        assert_eq!(parse_list(out), ["a_new_syn", "ipv6_loopback_births"]);
    }

    fn exe(name: &str, tests: &[&str]) -> TestExecutable {
        TestExecutable {
            name: name.into(),
            exe: PathBuf::from(format!("/t/{name}")),
            tests: crate::strings(tests),
        }
    }

    #[test]
    fn the_plan_leaves_out_the_excluded_and_names_every_test() {
        let all = [
            exe("watch", &["births", "expiry"]),
            exe("workflow", &["the_workflow_tests_as_root_and_guards_a_job"]),
            exe(
                "reliability",
                &["btf_missing", "nothing_left_in_the_kernel_after_any_end"],
            ),
        ];
        let p = plan(&all, &Selection::default());
        assert_eq!(
            p.rows(),
            ["watch::births", "watch::expiry", "reliability::btf_missing"]
        );
        assert_eq!(
            p.left.iter().map(|l| l.what.as_str()).collect::<Vec<_>>(),
            [
                "workflow (1 test)",
                "reliability::nothing_left_in_the_kernel_after_any_end"
            ]
        );
        assert_eq!(
            p.guest_file(),
            "watch 1200 --test-threads=1 --color=never --exact births expiry\n\
             reliability 1200 --test-threads=1 --color=never --exact btf_missing\n"
        );
        let only = Selection {
            only: vec!["watch::exp".into()],
            ..Selection::default()
        };
        assert_eq!(plan(&all, &only).rows(), ["watch::expiry"]);
        let skip = Selection {
            skip: vec!["watch::".into(), "btf".into()],
            ..Selection::default()
        };
        let p = plan(&all, &skip);
        assert!(p.rows().is_empty(), "{:?}", p.rows());
        let left: Vec<(&str, &str)> = p.left.iter().map(|l| (l.what.as_str(), l.why)).collect();
        assert!(left.contains(&("watch (2 tests)", SKIPPED)), "{left:?}");
        assert!(
            left.contains(&("reliability::btf_missing", SKIPPED)),
            "{left:?}"
        );
    }

    #[test]
    fn every_exclusion_has_a_reason() {
        for (e, _, why) in EXCLUDED {
            assert!(!e.is_empty() && why.len() > 20, "{e}: {why}");
        }
    }
}
