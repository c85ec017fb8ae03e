//! The eBPF object is linked by the external `bpf-linker` binary, which cargo knows nothing
//! about. Rebuild when it changes (a new LLVM behind it changes the output) and fail early, with
//! the fix, when it is missing.
fn main() {
    match which::which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => panic!(
            "bpf-linker not found in PATH: run `cargo +stable xtask setup`, which installs it"
        ),
    }
}
