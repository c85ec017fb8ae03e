//! Failures a user can act on: one line saying what is wrong and what to do, and a distinct,
//! documented exit code (README "Exit codes").

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// Anything unexpected.
    Error = 1,
    /// Bad usage (clap uses 2 too).
    Usage = 2,
    // 3: `exec`, a budget was exceeded.
    /// Not root and not the needed capabilities.
    Privilege = 4,
    /// The kernel lacks something twtrace needs (version, BTF, a symbol, visible addresses).
    Kernel = 5,
    /// tracefs is neither mounted nor mountable.
    Tracefs = 6,
    /// The kernel refused to load a program, create a map or attach.
    Refused = 7,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The exit code and the one line to print for any error that reaches `main`.
pub fn report(err: &anyhow::Error) -> (Code, String) {
    match err.downcast_ref::<Failure>() {
        Some(f) => (f.code, f.message.clone()),
        None => (Code::Error, format!("{err:#}")),
    }
}
