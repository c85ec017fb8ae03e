//! Failures a user can act on: one line saying what is wrong and what to do, and a distinct,
//! documented exit code (README "Exit codes").

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Code {
    /// Anything unexpected.
    Error = 1,
    /// Bad usage (clap uses 2 too): a value that does not parse, an output file that cannot
    /// be written.
    Usage = 2,
    /// Not root and not the needed capabilities.
    Privilege = 4,
    /// The kernel lacks something twtrace needs (version, BTF, a symbol, visible addresses).
    Kernel = 5,
    // 6 was "tracefs is neither mounted nor mountable": no program needs tracefs any more; the
    // number is not reused, so that scripts written for it never misread another failure.
    /// The kernel refused to load a program, create a map or attach.
    Refused = 7,
    /// `serve` cannot listen on its address (in use, or not on this host): it may be free in a
    /// moment, so a supervisor should restart it (not bad usage).
    Listen = 8,
    /// `doctor`: a finding at least as severe as `--fail-on`.
    Findings = 9,
}

/// `exec`'s own exit codes, out of the way of the command's, as timeout(1) and env(1) do.
pub mod exec_code {
    /// A budget was exceeded (the command's own status is in the summary).
    pub const BUDGET: u8 = 124;
    /// twtrace itself failed: an unexpected error or bad usage (the message says which; the
    /// environment's codes 4 to 7 keep their meaning).
    pub const FAILED: u8 = 125;
    /// The command was found but cannot be run (permission, format).
    pub const CANNOT_RUN: u8 = 126;
    /// The command was not found.
    pub const NOT_FOUND: u8 = 127;
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

/// Exit with this code and say nothing more (`exec` passing on its command's exit code; what
/// happened was already printed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitWith(pub u8);

impl fmt::Display for ExitWith {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit {}", self.0)
    }
}

impl std::error::Error for ExitWith {}

/// The exit code, and the one line to print (None: nothing) for any error that reaches `main`.
pub fn report(err: &anyhow::Error) -> (u8, Option<String>) {
    if let Some(ExitWith(code)) = err.downcast_ref::<ExitWith>() {
        return (*code, None);
    }
    match err.downcast_ref::<Failure>() {
        Some(f) => (f.code as u8, Some(f.message.clone())),
        None => (Code::Error as u8, Some(format!("{err:#}"))),
    }
}
