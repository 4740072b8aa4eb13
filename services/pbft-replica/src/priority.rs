//! Scheduling priority of the replica's background threads.
//!
//! The redb flush (once per stable checkpoint: a checkpoint interval's blocks into redb,
//! then an fsync) and the snapshot writer are bulk work nobody waits for, but each burst
//! takes a core for tens of milliseconds. Where replicas share their cores (two cores for
//! four replicas and the load generator in `make bench`), requests queued behind such a
//! burst set the tail latency. A higher nice value lets the protocol threads go first and
//! leaves the background threads what is idle.

/// Nice value for background threads: lower priority than the default 0, not idle-only.
const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`BACKGROUND_NICE`]. On Linux a thread has a
/// nice value of its own (`setpriority` on its thread id); elsewhere this does nothing.
/// Failure only costs latency, so it is logged, not returned.
pub fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(tid), BACKGROUND_NICE) {
            tracing::warn!(error = %e, "cannot lower a background thread's priority");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn lowers_this_thread_and_not_the_others() {
        let before = rustix::process::getpriority_process(None).expect("getpriority");
        let lowered = std::thread::spawn(|| {
            super::lower_this_thread();
            rustix::process::getpriority_process(Some(rustix::thread::gettid()))
                .expect("getpriority")
        })
        .join()
        .expect("thread");
        assert!(lowered >= super::BACKGROUND_NICE, "nice {lowered}");
        let after = rustix::process::getpriority_process(Some(rustix::thread::gettid()))
            .expect("getpriority");
        assert_eq!(after, before, "the calling thread keeps its priority");
    }
}
