//! The commands: each reads lifecycle events (or an aggregate of them) from a session and
//! renders them. Takes in a `track::session::Session`; hands on output to the user.

pub mod doctor;
pub mod exec;
pub mod report;
pub mod serve;
pub mod top;
pub mod watch;
