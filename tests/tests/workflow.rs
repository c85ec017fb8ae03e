//! The GitHub Actions workflow parses, runs the project's test command with root, and shows
//! `twtrace exec` guarding a job with the options it really has.

use std::process::Command;

use serde_json::Value;

fn workflow() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../.github/workflows/ci.yml");
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            path,
        ])
        .output()
        .expect("python3 (with python3-yaml, installed by xtask setup)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn runs(job: &Value) -> String {
    job["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["run"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_workflow_tests_as_root_and_guards_a_job() {
    let w = workflow();
    let jobs = &w["jobs"];
    let test = runs(&jobs["test"]);
    assert!(
        test.contains("sudo") && test.contains("./.ci/run"),
        "{test}"
    );
    assert_eq!(jobs["guarded"]["needs"], "test");
    let guarded = runs(&jobs["guarded"]);
    let line = guarded
        .lines()
        .find(|l| l.contains("twtrace exec"))
        .expect("a step runs twtrace exec");
    assert!(line.contains("sudo"), "{line}");
    // The options used exist: the binary's own help lists them.
    let help = Command::new(twtrace_tests::twtrace_bin())
        .args(["exec", "--help"])
        .output()
        .expect("twtrace exec --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for opt in line.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(help.contains(opt), "{opt} is not an exec option:\n{help}");
    }
}
