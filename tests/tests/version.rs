//! `twtrace --version` names exactly what runs: the crate version, the commit it was built from
//! and the start of the SHA-256 of the kernel object it embeds.
//!
//! Nothing here needs root.

use std::process::Command;

use sha2::{Digest, Sha256};
use twtrace_tests::{run, twtrace_bin};

#[test]
fn version_names_the_commit_and_the_kernel_object() {
    let printed = run(Command::new(twtrace_bin()).arg("--version"));
    let commit = run(Command::new("git").args(["rev-parse", "--short=12", "HEAD"]));
    // The binary and this test come from one build, so they embed the same object.
    let object: String = Sha256::digest(twtrace::kernel::probes::OBJECT)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        printed,
        format!(
            "twtrace {} (git {}, ebpf {})\n",
            env!("CARGO_PKG_VERSION"),
            commit.trim(),
            &object[..12]
        )
    );
    // -V prints the same line.
    assert_eq!(run(Command::new(twtrace_bin()).arg("-V")), printed);
}
