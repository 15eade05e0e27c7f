//! A warm pool's sandbox as pure decisions see it, and the order claimers try them in: shared by
//! the controller (which keeps pools) and the Kubernetes runtime (which claims from them).

use crate::k8s::crd::Sandbox;
use kube::ResourceExt;

/// A pool's sandbox as the cache shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub ready: bool,
    /// Claimed by a session: no longer the pool's to count or delete.
    pub claimed: bool,
    /// Being deleted (a deletion timestamp).
    pub deleting: bool,
}

/// The order in which a claimer tries ready, unclaimed sandboxes: a permutation drawn from `seed`
/// (random per claim), so concurrent claimers spread over the pool instead of walking the same
/// sequence, and the loser of a race lands somewhere else next.
pub fn claim_order(members: &[Member], seed: usize) -> Vec<&str> {
    use std::hash::{Hash, Hasher};
    let mut ready: Vec<(u64, &str)> = members
        .iter()
        .filter(|m| m.ready && !m.claimed && !m.deleting)
        .map(|m| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (seed, &m.name).hash(&mut h);
            (h.finish(), m.name.as_str())
        })
        .collect();
    ready.sort_unstable();
    ready.into_iter().map(|(_, name)| name).collect()
}

/// A pool member as the pure functions see it.
pub fn member(s: &Sandbox) -> Member {
    let status = s.status.clone().unwrap_or_default();
    Member {
        name: s.name_any(),
        ready: status.phase.as_deref() == Some("Ready"),
        claimed: status.claimed_by.is_some(),
        deleting: s.metadata.deletion_timestamp.is_some(),
    }
}
