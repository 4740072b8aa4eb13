//! Loopback ports for test clusters, reserved across every test process running at once.
//!
//! A port that is merely free when a test picks it can be taken by another test process
//! before the replica binds it, or while a replica is down for a restart (nextest runs tests
//! as concurrent processes, so an in-process counter cannot prevent that). A reservation is
//! an exclusive lock on a file named after the address, held until this process exits; the
//! kernel drops it even when the test crashes, so nothing stale is left locked. The empty
//! lock files themselves stay behind: deleting a lock file that another process may be about
//! to lock would let two processes hold "the same" lock.

use std::fs::{File, OpenOptions};
use std::net::TcpListener;
use std::sync::Mutex;

/// Locks held for the life of this process (one per reserved address).
static HELD: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Reserves `ip:port` for this process: true when no other test (process or thread) holds
/// it and it can be bound now.
pub fn reserve(ip: &str, port: u16) -> bool {
    let dir = std::env::temp_dir().join("pbft-test-ports");
    if std::fs::create_dir_all(&dir).is_err() {
        return false;
    }
    let Ok(lock) = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(format!("{ip}_{port}")))
    else {
        return false;
    };
    // flock locks belong to the open file, so a second open in this same process conflicts
    // too: threads of one test binary (plain `cargo test`) are kept apart as well.
    // (`File::try_lock` would do, but is newer than this workspace's minimum Rust.)
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function owns; it touches no memory.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked || TcpListener::bind((ip, port)).is_err() {
        return false;
    }
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(lock);
    true
}

/// Picks a port below the kernel's ephemeral range (32768+), so that no outgoing connection
/// can take it, for which `usable` holds; `salt` spreads the processes' first tries apart.
pub fn pick(salt: u64, span: u16, mut usable: impl FnMut(u16) -> bool) -> Option<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = u64::from(std::process::id()) * 7919
        + salt
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0);
    let range = 22_000 - u64::from(span);
    (0..10_000).find_map(|_| {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 10_000 + (seed.wrapping_add(k * 104_729) % range) as u16;
        usable(port).then_some(port)
    })
}
