//! What `cargo +stable xtask dist` built, for the install tests: the directory is
//! `TWTRACE_DIST` (set by `xtask test`) or target/packages, and each archive is found through its
//! SHA256SUMS and checked against it.

use std::{path::PathBuf, process::Command, sync::Once};

use crate::deploy::{combined, output, read, root};

const BUILD_IT: &str = "build it with `cargo +stable xtask dist` (`cargo +stable xtask test` does)";

pub fn dir() -> PathBuf {
    std::env::var_os("TWTRACE_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/packages"))
}

/// The static binary.
pub fn binary() -> PathBuf {
    let bin = dir().join("twtrace");
    assert!(bin.exists(), "{} is missing: {BUILD_IT}", bin.display());
    bin
}

/// The archive whose name ends with `suffix` (`.tar.gz`, `.deb`, `-oci.tar`), as SHA256SUMS
/// lists it; every listed file matches its sum (checked once per test binary).
pub fn archive(suffix: &str) -> PathBuf {
    let sums = dir().join("SHA256SUMS");
    assert!(sums.exists(), "{} is missing: {BUILD_IT}", sums.display());
    static CHECKED: Once = Once::new();
    CHECKED.call_once(|| {
        let out = output(
            Command::new("sha256sum")
                .args(["--check", "--strict", "SHA256SUMS"])
                .current_dir(dir()),
        );
        assert!(
            out.status.success(),
            "sha256sum --check: {}",
            combined(&out)
        );
    });
    let names: Vec<String> = read(&sums)
        .lines()
        .filter_map(|l| l.split_once("  ").map(|(_, name)| name.to_owned()))
        .filter(|name| name.ends_with(suffix))
        .collect();
    assert_eq!(names.len(), 1, "SHA256SUMS lists one *{suffix}: {names:?}");
    dir().join(&names[0])
}

/// The clean Debian root (a tarball made by mmdebstrap) the .deb is installed into:
/// `TWTRACE_DEBIAN_ROOT` (set by `xtask test`), or where `xtask setup` puts it.
pub fn debian_root() -> PathBuf {
    let tarball = std::env::var_os("TWTRACE_DEBIAN_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/dist-cache/debian-bookworm-minbase.tar"));
    assert!(
        tarball.exists(),
        "{} is missing: `sudo -E cargo +stable xtask setup` makes it",
        tarball.display()
    );
    tarball
}
