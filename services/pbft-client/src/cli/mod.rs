//! The `pbft` command line: cluster layout on disk, the local cluster (`pbft up`), and the
//! everyday commands.

pub mod bench;
pub mod cluster;
pub mod commands;
pub mod http;
pub mod lease;
pub mod table;
pub mod up;

/// Exit codes scripts can rely on.
pub mod exit {
    pub const OK: i32 = 0;
    pub const ERROR: i32 = 1;
    /// No quorum answered in time: the cluster is down or partitioned.
    pub const UNAVAILABLE: i32 = 3;
    /// `get` of a key that does not exist.
    pub const NOT_FOUND: i32 = 4;
    /// `cas` found a different value.
    pub const CAS_MISMATCH: i32 = 5;
    /// `verify-ledger` found a bad block.
    pub const LEDGER_INVALID: i32 = 6;
}

/// The cluster, or the replica a command needs, did not answer: exit code
/// `exit::UNAVAILABLE`, as when no quorum answers a request.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// Writes `text` to stdout and flushes. Unlike `print!`, a closed stdout (`pbft status |
/// head -1`) is an error to handle, not a panic: commands ignore it, `pbft up` stops.
pub fn stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Asks a child process started by this one to stop (SIGTERM); waiting for it is the
/// caller's.
pub fn sigterm(child: &std::process::Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) only. The `Child` is held and, as callers reap with it alone, not
        // yet reaped, so the pid still names that child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// How commands print data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}
