//! The Kubernetes side of the runtime: sandboxes are `Sandbox` resources whose Pods the controller
//! runs. A claim hands a ready one to a claimer with a single compare-and-set write.
//!
//! It knows Sandboxes and who claimed them (an opaque claimer id); it must not know sessions.

use crate::controller::warm_pool::{Member, claim_order, member};
use crate::crd::Sandbox;
use kube::api::{Api, ListParams, Patch, PatchParams};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The sandboxes this server is claiming right now. Claims from one server never race each other:
/// a claimer reserves a candidate here before its write, and others skip it. The write's
/// `resourceVersion` precondition still guards against other servers (replicas).
#[derive(Debug, Clone, Default)]
pub struct Reservations(Arc<Mutex<HashSet<String>>>);

impl Reservations {
    /// Reserves `name` unless another claimer holds it; released when the guard drops (also when
    /// a claim is abandoned midway).
    fn take(&self, name: &str) -> Option<Reserved<'_>> {
        let fresh = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        fresh.then(|| Reserved {
            book: self,
            name: name.to_string(),
        })
    }
}

struct Reserved<'a> {
    book: &'a Reservations,
    name: String,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.book
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

/// Candidates tried per claim: past that the caller's cache is stale and should be read again.
const TRIES: usize = 3;

/// A claim's result: the sandbox won (if any) and how many races were lost on the way.
#[derive(Debug)]
pub struct Claimed {
    pub sandbox: Option<Sandbox>,
    pub conflicts: u32,
}

/// The ready, unclaimed sandboxes of `template`, from the API (the server keeps this from its
/// watch cache; this is the uncached form).
pub async fn candidates(api: &Api<Sandbox>, template: &str) -> Result<Vec<Sandbox>, kube::Error> {
    let list = api
        .list(&ListParams::default().labels(&format!("sandwarden.dev/template={template}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .filter(|s| {
            let m = member(s);
            m.ready && !m.claimed && !m.deleting
        })
        .collect())
}

/// Claims one of `candidates` for `claimer`: tries up to three of them in an order drawn from
/// `seed` (random per claim), skipping those another claimer of this server has reserved, each
/// with one status patch carrying the `resourceVersion` it was seen at. A conflict means another
/// server won that one (or it changed), so another is tried; after three the caller reads its
/// cache again. One write per claim when servers do not collide.
pub async fn claim(
    api: &Api<Sandbox>,
    candidates: &[Sandbox],
    claimer: &str,
    seed: usize,
    reservations: &Reservations,
) -> Result<Claimed, kube::Error> {
    let members: Vec<Member> = candidates.iter().map(member).collect();
    let mut conflicts = 0;
    let mut tried = 0;
    for name in claim_order(&members, seed) {
        if tried == TRIES {
            break;
        }
        let Some(seen) = candidates
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
        else {
            continue;
        };
        let Some(reserved) = reservations.take(name) else {
            continue;
        };
        tried += 1;
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": seen.metadata.resource_version },
            "status": { "claimedBy": claimer },
        });
        let written = api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        drop(reserved);
        match written {
            Ok(won) => {
                return Ok(Claimed {
                    sandbox: Some(won),
                    conflicts,
                });
            }
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => conflicts += 1,
            Err(e) => return Err(e),
        }
    }
    Ok(Claimed {
        sandbox: None,
        conflicts,
    })
}
