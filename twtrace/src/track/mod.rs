//! What happened to each socket: kernel events paired into lifecycles (births, ends with their
//! reason and lifetime), filtered, and aggregated by port, peer, process and service.
//! Takes in `KernelEvent`s through a `session::Session`; hands on `lifecycle::Event`s and the
//! `aggregate::Aggregator`.

pub mod aggregate;
pub mod filter;
pub mod lifecycle;
pub mod session;
