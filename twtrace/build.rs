//! Builds the kernel programs (`twtrace-ebpf`) for the BPF target and puts the object in
//! OUT_DIR, where `kernel/probes.rs` embeds it.

use aya_build::{Package, Toolchain};

/// The eBPF crate's compiler must use the same LLVM as bpf-linker (22): Rust 1.98.0 does.
const EBPF_TOOLCHAIN: &str = "1.98.0";

fn main() -> anyhow::Result<()> {
    // `-Z build-std=core` on a stable toolchain (the BPF target ships no prebuilt core).
    // SAFETY: the build script is single-threaded here.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
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
    )
}
