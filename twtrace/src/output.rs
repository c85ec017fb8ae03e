//! Where the views write: standard output (a reader that leaves ends the run quietly; any other
//! write error names standard output), standard error (never a panic when it is closed), files
//! given on the command line (opened before anything is attached, so that a path that cannot be
//! written is bad usage found at once), and text made safe for a terminal.

use std::{
    borrow::Cow,
    fmt::Write as _,
    fs::File,
    io,
    path::{Path, PathBuf},
};

use crate::failure::{Code, Failure};

/// One line on standard error, `twtrace: ` first. A closed or full standard error is ignored
/// (the standard library's `eprintln!` panics then): what twtrace has to say is never worth a
/// crash, and the exit code still tells.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), "twtrace: {}", format_args!($($arg)*));
    }};
}

/// The same without the `twtrace: ` prefix (continuation lines, progress).
#[macro_export]
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut e = std::io::stderr().lock();
        let _ = write!(e, $($arg)*);
        let _ = e.flush();
    }};
}

/// What a failed write to standard output means: None when the reader went away (a closed
/// pipe: the run ends normally, as `yes | head -1` does), else the failure to report.
pub fn stdout_failure(e: &io::Error) -> Option<Failure> {
    (e.kind() != io::ErrorKind::BrokenPipe)
        .then(|| Failure::new(Code::Error, format!("cannot write to standard output: {e}")))
}

/// A write to standard output that ended: Ok when it went through or the reader left, the
/// failure otherwise.
pub fn stdout_result(r: io::Result<()>) -> Result<(), Failure> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => match stdout_failure(&e) {
            None => Ok(()),
            Some(f) => Err(f),
        },
    }
}

/// A file named on the command line (`option` says which), created (or truncated) now, before
/// anything is attached: a path that cannot be written is bad usage, found before the run.
pub fn create(option: &str, path: &Path) -> Result<File, Failure> {
    File::create(path).map_err(|e| {
        Failure::new(
            Code::Usage,
            format!("{option} {}: cannot write there: {e}", path.display()),
        )
    })
}

/// `create` for an optional path.
pub fn create_opt(option: &str, path: Option<&PathBuf>) -> Result<Option<File>, Failure> {
    path.map(|p| create(option, p)).transpose()
}

/// `s` with every character a terminal would act on escaped: control characters as `\n`,
/// `\t`, `\e` or `\xHH` (`\u{HHHH}` beyond ASCII), and the backslash itself as `\\`, so that a
/// process name cannot split a line or send escape sequences to the reader's terminal (ps
/// shows them as `?`; this keeps them legible). JSON and /metrics escape on their own.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() || c == '\\') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\x1b' => out.push_str("\\e"),
            c if c.is_control() && (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(printable("nginx"), "nginx");
        assert_eq!(printable("a\x1b[31mb\nc"), "a\\e[31mb\\nc");
        assert_eq!(printable("x\x07\x7f\u{9b}y"), "x\\x07\\x7f\\u{009b}y");
        assert_eq!(printable("back\\slash\tend"), "back\\\\slash\\tend");
        assert_eq!(printable("é中"), "é中");
    }

    #[test]
    fn a_closed_pipe_is_not_a_failure() {
        assert!(stdout_failure(&io::ErrorKind::BrokenPipe.into()).is_none());
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        let f = stdout_failure(&full).unwrap();
        assert!(
            f.message.starts_with("cannot write to standard output: "),
            "{}",
            f.message
        );
    }
}
