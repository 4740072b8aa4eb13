//! Per-sequence-number agreement state for the current view.

use std::collections::BTreeMap;

use crate::message::{Commit, Message, PrePrepare, Prepare, Signed};
use crate::types::{Digest, ReplicaId};

/// What a replica knows about one sequence number in its current view.
#[derive(Clone, Debug, Default)]
pub(crate) struct Slot {
    pub pre_prepare: Option<Signed<PrePrepare>>,
    /// First prepare from each replica (a second with another digest is equivocation),
    /// replaced only by the same vote upgraded to vouching.
    pub prepares: BTreeMap<ReplicaId, Signed<Prepare>>,
    pub commits: BTreeMap<ReplicaId, Signed<Commit>>,
    pub prepared: bool,
    pub committed: bool,
    /// Every request of the batch is known to carry its client's valid signature: this
    /// replica checked them (or proposed them), or the batch came from a prepared
    /// certificate. A backup's prepare vouches only if this held when it was sent (or
    /// upgraded: `Replica::upgrade_own_prepare`).
    pub valid: bool,
    /// This replica checked the batch's signatures and one failed: the primary is faulty.
    pub invalid: bool,
    /// Own votes, kept to re-send when progress stalls.
    pub own_prepare: Option<Signed<Prepare>>,
    pub own_commit: Option<Signed<Commit>>,
}

impl Slot {
    pub fn digest(&self) -> Option<Digest> {
        self.pre_prepare.as_ref().map(|p| p.body.digest)
    }

    /// Prepares matching the accepted pre-prepare, from backups (never the primary).
    pub fn matching_prepares(&self, primary: ReplicaId) -> Vec<Signed<Prepare>> {
        let Some(d) = self.digest() else {
            return Vec::new();
        };
        self.prepares
            .iter()
            .filter(|(r, p)| **r != primary && p.body.digest == d)
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Prepares for the accepted pre-prepare that make a prepared certificate: `needed`
    /// (2f) from backups of which at least `vouches` (f) vouch, vouching ones first; the
    /// pre-prepare is the primary's vouch. `None` while there are not enough.
    pub fn certificate_prepares(
        &self,
        primary: ReplicaId,
        needed: usize,
        vouches: usize,
    ) -> Option<Vec<Signed<Prepare>>> {
        let (vouching, others): (Vec<_>, Vec<_>) = self
            .matching_prepares(primary)
            .into_iter()
            .partition(|p| p.body.vouches);
        if vouching.len() < vouches {
            return None;
        }
        let mut prepares = vouching;
        prepares.extend(others);
        (prepares.len() >= needed).then(|| {
            prepares.truncate(needed);
            prepares
        })
    }

    /// What this replica said about the slot: its pre-prepare (if it is the primary) and its
    /// own prepare and commit, for re-sending.
    pub fn own_votes(&self, is_primary: bool) -> Vec<Message> {
        let pp = self
            .pre_prepare
            .iter()
            .filter(|_| is_primary)
            .map(|pp| Message::PrePrepare(pp.clone()));
        let prepare = self.own_prepare.iter().map(|p| Message::Prepare(p.clone()));
        let commit = self.own_commit.iter().map(|c| Message::Commit(c.clone()));
        pp.chain(prepare).chain(commit).collect()
    }

    pub fn matching_commits(&self) -> Vec<Signed<Commit>> {
        let Some(d) = self.digest() else {
            return Vec::new();
        };
        self.commits
            .values()
            .filter(|c| c.body.digest == d)
            .cloned()
            .collect()
    }
}
