//! The Kubernetes side of the runtime: sandboxes are `Sandbox` resources whose Pods the controller
//! runs. A claim hands a ready one to a claimer with a single compare-and-set write.
//!
//! It knows Sandboxes and who claimed them (an opaque claimer id); it must not know sessions.

use crate::controller::warm_pool::{Member, claim_order};
use crate::crd::Sandbox;
use kube::api::{Api, ListParams, Patch, PatchParams};

/// A claim's result: the sandbox won (if any) and how many races were lost on the way.
#[derive(Debug)]
pub struct Claimed {
    pub sandbox: Option<Sandbox>,
    pub conflicts: u32,
}

fn member(s: &Sandbox) -> Member {
    let status = s.status.clone().unwrap_or_default();
    Member {
        name: s.metadata.name.clone().unwrap_or_default(),
        ready: status.phase.as_deref() == Some("Ready"),
        claimed: status.claimed_by.is_some(),
        deleting: s.metadata.deletion_timestamp.is_some(),
    }
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

/// Claims one of `candidates` for `claimer`: tries them in a rotation starting at `seed` (random
/// per claim), each with one status patch carrying the `resourceVersion` it was seen at. A
/// conflict means another claimer won that one (or it changed), so the next is tried; one write
/// per claim when nobody races.
pub async fn claim(
    api: &Api<Sandbox>,
    candidates: &[Sandbox],
    claimer: &str,
    seed: usize,
) -> Result<Claimed, kube::Error> {
    let members: Vec<Member> = candidates.iter().map(member).collect();
    let mut conflicts = 0;
    for name in claim_order(&members, seed) {
        let Some(seen) = candidates
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(name))
        else {
            continue;
        };
        let patch = serde_json::json!({
            "metadata": { "resourceVersion": seen.metadata.resource_version },
            "status": { "claimedBy": claimer },
        });
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
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
