//! Which registered client ids this process may use. A PBFT client has one request in
//! flight and increasing timestamps, and replicas drop a request older than the last one
//! they executed for its client; so two processes using one id at once (two `pbft put` in
//! parallel, or `pbft bench` beside `pbft up --load`) would make one of them stale: dropped
//! without an answer, it would time out. Each process therefore leases the
//! ids it uses with a lock file per id (`<data>/locks/client-<id>.lock`), held until it
//! exits. Where no lock file can be kept (a read-only data directory) the ids are used
//! without one, with a warning.

use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::cluster::ClusterFile;

/// Client ids held by this process; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct ClientLease {
    ids: Vec<u64>,
    _locks: Vec<File>,
}

impl ClientLease {
    pub fn ids(&self) -> &[u64] {
        &self.ids
    }
}

fn lock_dir(dir: &Path) -> PathBuf {
    dir.join("locks")
}

/// Errors that mean this process cannot keep lock files in the data directory (a
/// read-only mount, another user's directory): ids are then used without a lease.
fn cannot_lock_here(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
    )
}

/// Tries to hold `id`: `Ok(Some(file))` if this process now holds it, `Ok(None)` if another
/// does.
fn try_hold(locks: &Path, id: u64) -> std::io::Result<Option<File>> {
    let path = locks.join(format!("client-{id}.lock"));
    // Read access is enough for a lock; creating the file needs write access to the
    // directory, which an existing file does not.
    let file = match fs::OpenOptions::new().read(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?,
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// The first free ids of `candidates` in their order, at most `max` of them.
fn hold_free(locks: &Path, candidates: &[u64], max: usize) -> std::io::Result<ClientLease> {
    let mut lease = ClientLease {
        ids: Vec::with_capacity(max),
        _locks: Vec::with_capacity(max),
    };
    for &id in candidates {
        if lease.ids.len() == max {
            break;
        }
        if let Some(file) = try_hold(locks, id)? {
            lease.ids.push(id);
            lease._locks.push(file);
        }
    }
    Ok(lease)
}

/// Where no lock can be kept: the ids are used as they are, and this says so once.
fn unleased(dir: &Path, ids: Vec<u64>, e: &std::io::Error) -> ClientLease {
    eprintln!(
        "warning: cannot keep client-id locks in {} ({e}); running pbft processes on this cluster \
         in parallel may make some requests time out",
        lock_dir(dir).display()
    );
    ClientLease {
        ids,
        _locks: Vec::new(),
    }
}

/// One id for a command (`put`, `get`, ...): the CLI's own id, or, while another command
/// holds it, a load client's, taken from the top so that benchmarks and demo load (which
/// take theirs from the bottom) rarely meet it. With every id held it waits, up to
/// `wait`, for one to be freed.
pub fn for_command(dir: &Path, cluster: &ClusterFile, wait: Duration) -> Result<ClientLease> {
    let candidates: Vec<u64> = std::iter::once(cluster.client_id)
        .chain(cluster.load_clients.iter().rev().copied())
        .collect();
    let locks = lock_dir(dir);
    if let Err(e) = fs::create_dir_all(&locks) {
        if cannot_lock_here(&e) {
            return Ok(unleased(dir, vec![cluster.client_id], &e));
        }
        return Err(e).with_context(|| format!("cannot create {}", locks.display()));
    }
    let deadline = Instant::now() + wait;
    loop {
        let lease = match hold_free(&locks, &candidates, 1) {
            Ok(l) => l,
            Err(e) if cannot_lock_here(&e) => {
                return Ok(unleased(dir, vec![cluster.client_id], &e));
            }
            Err(e) => return Err(e).with_context(|| format!("cannot lock in {}", locks.display())),
        };
        if !lease.ids.is_empty() {
            return Ok(lease);
        }
        if Instant::now() >= deadline {
            bail!(
                "all {} client ids of the cluster in {} are in use by other pbft processes \
                 (waited {wait:?} for one)",
                candidates.len(),
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Load clients for `pbft bench` or `pbft up --load`, from the bottom: up to `want`, and
/// at least `need` (fewer is an error naming `what`).
pub fn for_load(
    dir: &Path,
    cluster: &ClusterFile,
    want: usize,
    need: usize,
    what: &str,
) -> Result<ClientLease> {
    let locks = lock_dir(dir);
    let held =
        fs::create_dir_all(&locks).and_then(|()| hold_free(&locks, &cluster.load_clients, want));
    let lease = match held {
        Ok(l) => l,
        Err(e) if cannot_lock_here(&e) => {
            let ids = cluster.load_clients.iter().take(want).copied().collect();
            return Ok(unleased(dir, ids, &e));
        }
        Err(e) => return Err(e).with_context(|| format!("cannot lock in {}", locks.display())),
    };
    if lease.ids.len() < need {
        bail!(
            "{what} needs {need} load clients but only {} of the {} registered are free: other \
             pbft processes on {} hold the rest (`pbft up --load`, another `pbft bench`, or \
             commands); stop them or ask for fewer",
            lease.ids.len(),
            cluster.load_clients.len(),
            dir.display()
        );
    }
    Ok(lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(load: u64) -> ClusterFile {
        ClusterFile {
            transport: "grpc".into(),
            replicas: Vec::new(),
            client_id: 0,
            load_clients: (1..=load).collect(),
            tls: None,
        }
    }

    #[test]
    fn two_holders_never_share_an_id_and_a_drop_frees_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = cluster(4);
        let wait = Duration::ZERO;
        let first = for_command(dir.path(), &c, wait).expect("first");
        assert_eq!(first.ids(), [0]);
        // While the CLI's id is held, a second command takes a load client's, from the top.
        let second = for_command(dir.path(), &c, wait).expect("second");
        assert_eq!(second.ids(), [4]);
        // Load takes from the bottom, around what commands hold.
        let load = for_load(dir.path(), &c, 3, 3, "pbft bench").expect("load");
        assert_eq!(load.ids(), [1, 2, 3]);
        let e = for_load(dir.path(), &c, 1, 1, "pbft bench").expect_err("none left");
        assert!(e.to_string().contains("only 0 of the 4"), "{e}");
        // An open loop takes what is free, if that is enough.
        assert!(
            for_load(dir.path(), &c, 2, 0, "open loop")
                .expect("some")
                .ids()
                .is_empty()
        );
        // A command with every id held fails after its wait, saying why.
        let e = for_command(dir.path(), &c, wait).expect_err("all held");
        assert!(
            e.to_string().contains("in use by other pbft processes"),
            "{e}"
        );
        drop(second);
        assert_eq!(
            for_load(dir.path(), &c, 1, 1, "x").expect("freed").ids(),
            [4]
        );
        drop(first);
        assert_eq!(for_command(dir.path(), &c, wait).expect("freed").ids(), [0]);
    }
}
