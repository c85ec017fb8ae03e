//! The views: each reads lifecycle events (or an aggregate of them) and renders them.

pub mod doctor;
pub mod exec;
pub mod report;
pub mod serve;
pub mod top;
pub mod watch;
