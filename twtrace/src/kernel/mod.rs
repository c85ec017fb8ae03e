//! The kernel side, seen from userspace: checks before loading, the programs loaded and
//! attached, the ring buffer read and its records decoded.
//! Takes in the running kernel (BTF, kallsyms, tracefs); hands on `decode::KernelEvent`s.

pub mod btf;
pub mod decode;
pub mod preflight;
pub mod probes;
pub mod source;
