//! Which registered client ids this process may use. A PBFT client has one request in
//! flight and increasing timestamps, and replicas drop a request older than the last one
//! they executed for its client; so two processes using one id at once (two `pbft put` in
//! parallel, or `pbft bench` beside `pbft up --load`) would make one of them stale: dropped
//! without an answer, it would time out as "no quorum". Each process therefore leases the
//! ids it uses with a lock file per id (`<data>/locks/client-<id>.lock`), held until it
//! exits.

use std::fs::{self, File, TryLockError};
use std::path::{Path, PathBuf};

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

/// Tries to hold `id`: `Ok(Some(file))` if this process now holds it, `Ok(None)` if another
/// does.
fn try_hold(locks: &Path, id: u64) -> Result<Option<File>> {
    let path = locks.join(format!("client-{id}.lock"));
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        Err(TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Holds the first `count` free ids of `candidates`, in their order, or fails saying how
/// many were free.
fn hold(dir: &Path, candidates: &[u64], count: usize, what: &str) -> Result<ClientLease> {
    let locks = lock_dir(dir);
    fs::create_dir_all(&locks).with_context(|| format!("cannot create {}", locks.display()))?;
    let mut lease = ClientLease {
        ids: Vec::with_capacity(count),
        _locks: Vec::with_capacity(count),
    };
    for &id in candidates {
        if lease.ids.len() == count {
            break;
        }
        if let Some(file) = try_hold(&locks, id)? {
            lease.ids.push(id);
            lease._locks.push(file);
        }
    }
    if lease.ids.len() < count {
        bail!(
            "{what} needs {count} client ids but only {} of the {} registered are free: other \
             pbft processes on {} use the rest (`pbft up --load`, `pbft bench`); stop them or ask for fewer",
            lease.ids.len(),
            candidates.len(),
            dir.display()
        );
    }
    Ok(lease)
}

/// One id for a command (`put`, `get`, ...): the CLI's own id, or, while another command
/// holds it, a load client's, taken from the top so that benchmarks and demo load (which
/// take theirs from the bottom) rarely meet it.
pub fn for_command(dir: &Path, cluster: &ClusterFile) -> Result<ClientLease> {
    let candidates: Vec<u64> = std::iter::once(cluster.client_id)
        .chain(cluster.load_clients.iter().rev().copied())
        .collect();
    hold(dir, &candidates, 1, "this command")
}

/// `count` load clients for `pbft bench` or `pbft up --load`, from the bottom.
pub fn for_load(
    dir: &Path,
    cluster: &ClusterFile,
    count: usize,
    what: &str,
) -> Result<ClientLease> {
    hold(dir, &cluster.load_clients, count, what)
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
        let first = for_command(dir.path(), &c).expect("first");
        assert_eq!(first.ids(), [0]);
        // While the CLI's id is held, a second command takes a load client's, from the top.
        let second = for_command(dir.path(), &c).expect("second");
        assert_eq!(second.ids(), [4]);
        // Load takes from the bottom, around what commands hold.
        let load = for_load(dir.path(), &c, 3, "pbft bench").expect("load");
        assert_eq!(load.ids(), [1, 2, 3]);
        let e = for_load(dir.path(), &c, 1, "pbft bench").expect_err("none left");
        assert!(e.to_string().contains("only 0 of the 4"), "{e}");
        drop(second);
        assert_eq!(for_load(dir.path(), &c, 1, "x").expect("freed").ids(), [4]);
        drop(first);
        assert_eq!(for_command(dir.path(), &c).expect("freed").ids(), [0]);
    }
}
