//! twtrace: where a Linux host's TCP TIME_WAIT sockets come from.
//!
//! Data flows one way: kernel programs -> ring buffer (`source`) -> `decode` -> `lifecycle`
//! -> views. See ARCHITECTURE.md.

pub mod aggregate;
pub mod api;
pub mod btf;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod decode;
pub mod diagnose;
pub mod failure;
pub mod filter;
pub mod host;
pub mod lifecycle;
pub mod metrics;
pub mod preflight;
pub mod privileges;
pub mod probes;
pub mod report;
pub mod session;
pub mod sockdiag;
pub mod source;
pub mod views;
