//! Builds the kernel programs (`twtrace-ebpf`) for the BPF target and puts the object in
//! OUT_DIR, where `kernel/probes.rs` embeds it; then names the build for `twtrace --version`:
//! the git commit and the SHA-256 of that object (`TWTRACE_GIT_COMMIT`, `TWTRACE_EBPF_SHA256`).

use std::{env, fs, path::Path, process::Command};

use aya_build::{Package, Toolchain};
use sha2::{Digest, Sha256};

/// The eBPF crate's compiler must use the same LLVM as bpf-linker (22): Rust 1.98.0 does.
const EBPF_TOOLCHAIN: &str = "1.98.0";
/// Hex digits of the commit and of the object's digest that `--version` prints: short enough
/// to read out in a bug report, long enough not to collide in one project's history.
const SHORT: usize = 12;

fn main() -> anyhow::Result<()> {
    // `-Z build-std=core` on a stable toolchain (the BPF target ships no prebuilt core).
    // SAFETY: the build script is single-threaded here.
    unsafe { env::set_var("RUSTC_BOOTSTRAP", "1") };
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../twtrace-ebpf");
    // aya-build watches the kernel crate; the types it shares with us live here.
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../twtrace-common")
    );
    aya_build::build_ebpf(
        [Package {
            name: "twtrace-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )?;

    let out_dir = env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR not set"))?;
    let object = fs::read(Path::new(&out_dir).join("twtrace-ebpf"))?;
    let digest: String = Sha256::digest(&object)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("cargo:rustc-env=TWTRACE_EBPF_SHA256={}", &digest[..SHORT]);
    println!("cargo:rustc-env=TWTRACE_GIT_COMMIT={}", git_commit());
    Ok(())
}

/// The commit being built: `TWTRACE_GIT_COMMIT` when set (a build from a source archive, which
/// has no .git), else git's HEAD, else `unknown`.
fn git_commit() -> String {
    println!("cargo:rerun-if-env-changed=TWTRACE_GIT_COMMIT");
    if let Ok(commit) = env::var("TWTRACE_GIT_COMMIT") {
        return commit;
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    // Run again when HEAD moves: HEAD itself (a checkout), the branch it points to (a commit)
    // and packed-refs (where git may keep that branch). Only files that exist: cargo reruns a
    // script on every build when one of its watched paths is missing.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    let watched = ["HEAD", "packed-refs"]
        .into_iter()
        .map(str::to_owned)
        .chain(branch);
    for name in watched {
        if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
            if path.is_file() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
    git(&["rev-parse", &format!("--short={SHORT}"), "HEAD"]).unwrap_or_else(|| "unknown".into())
}
