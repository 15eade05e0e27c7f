//! A `SandboxWarmPool`: pure decisions (how many sandboxes to create or which to delete, from the
//! members the watch cache shows plus the writes made but not yet observed (expectations), so a
//! slow cache or a restart never over-creates; the pool's status; the choice of a claim
//! candidate), then one reconcile pass that applies them.

use crate::k8s::crd::{Sandbox, SandboxSpec, SandboxWarmPool};
use crate::k8s::labels::POOL_LABEL;
use crate::k8s::member::{Member, member};
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Resource, ResourceExt};
use std::collections::BTreeSet;
use std::time::Duration;

/// Writes the controller made that the cache may not show yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectations {
    /// Names of sandboxes created but not yet seen.
    pub creating: BTreeSet<String>,
    /// Names of sandboxes deleted but still seen.
    pub deleting: BTreeSet<String>,
}

impl Expectations {
    /// Forgets what the cache now shows: created names it lists, deleted names it no longer does.
    pub fn observe(&mut self, members: &[Member]) {
        self.creating
            .retain(|n| !members.iter().any(|m| &m.name == n));
        self.deleting
            .retain(|n| members.iter().any(|m| &m.name == n && !m.deleting));
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolOp {
    Create(usize),
    /// Surplus to delete, the unready (least useful) first.
    Delete(Vec<String>),
    Nothing,
}

fn available(m: &Member, exp: &Expectations) -> bool {
    !m.claimed && !m.deleting && !exp.deleting.contains(&m.name)
}

/// Reaches `replicas` unclaimed sandboxes, counting creations not yet observed and never
/// counting deletions already asked for.
pub fn plan(replicas: i32, members: &[Member], exp: &Expectations) -> PoolOp {
    let want = usize::try_from(replicas).unwrap_or(0);
    let mut live: Vec<&Member> = members.iter().filter(|m| available(m, exp)).collect();
    let have = live.len() + exp.creating.len();
    if have < want {
        return PoolOp::Create(want - have);
    }
    if live.len() > want {
        // Only what exists can go; pending creations are left to arrive.
        let surplus = live.len() - want;
        live.sort_by_key(|m| (m.ready, std::cmp::Reverse(m.name.clone())));
        return PoolOp::Delete(
            live.into_iter()
                .take(surplus)
                .map(|m| m.name.clone())
                .collect(),
        );
    }
    PoolOp::Nothing
}

/// `(replicas, readyReplicas)` of the pool's status: its unclaimed sandboxes, and the ready ones.
pub fn counts(members: &[Member]) -> (i32, i32) {
    let unclaimed: Vec<&Member> = members
        .iter()
        .filter(|m| !m.claimed && !m.deleting)
        .collect();
    let ready = unclaimed.iter().filter(|m| m.ready).count();
    (
        i32::try_from(unclaimed.len()).unwrap_or(i32::MAX),
        i32::try_from(ready).unwrap_or(i32::MAX),
    )
}

/// The members of `pool` in the cache: sandboxes it owns.
fn members_of(pool: &SandboxWarmPool, cache: &Store<Sandbox>) -> Vec<std::sync::Arc<Sandbox>> {
    let uid = pool.metadata.uid.clone();
    let ns = pool.metadata.namespace.clone();
    cache
        .state()
        .into_iter()
        .filter(|s| {
            s.metadata.namespace == ns
                && s.owner_references()
                    .iter()
                    .any(|o| Some(&o.uid) == uid.as_ref())
        })
        .collect()
}

/// A new member's name: the pool's, a dash and five random characters (as `generateName` would,
/// but known before the write so it can be expected).
fn new_name(pool: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let suffix: String = (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect();
    let mut base = pool.to_string();
    base.truncate(63 - 6);
    format!("{base}-{suffix}")
}

fn new_member(pool: &SandboxWarmPool, name: String) -> Sandbox {
    let template = pool.spec.template_ref.name.clone();
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(POOL_LABEL.to_string(), pool.name_any());
    labels.insert(crate::k8s::labels::TEMPLATE.to_string(), template);
    labels.insert(
        crate::k8s::labels::MANAGED_BY.to_string(),
        crate::k8s::labels::MANAGER.to_string(),
    );
    Sandbox {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: pool.metadata.namespace.clone(),
            labels: Some(labels),
            owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: SandboxSpec {
            template_ref: pool.spec.template_ref.clone(),
            env: Default::default(),
            shutdown_time: None,
        },
        status: None,
    }
}

/// One pass over a pool: hand claimed members over to their claimers (no longer owned by the
/// pool, so deleting or shrinking it leaves live sessions alone), create or delete to reach
/// `replicas` counting `expectations`, and write the status. Returns when to look again.
pub async fn reconcile(
    client: &kube::Client,
    pool: &SandboxWarmPool,
    cache: &Store<Sandbox>,
    expectations: &mut Expectations,
) -> Result<Duration, super::sandbox::Error> {
    use super::sandbox::Error;
    let ns = pool.metadata.namespace.clone().ok_or(Error::Unnamed)?;
    let name = pool.metadata.name.clone().ok_or(Error::Unnamed)?;
    let sandboxes: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let pools: Api<SandboxWarmPool> = Api::namespaced(client.clone(), &ns);
    let write = |what: String| move |source| Error::Write { what, source };

    let cached = members_of(pool, cache);
    for s in cached.iter().filter(|s| member(s).claimed) {
        let release = serde_json::json!({
            "metadata": {
                "ownerReferences": [],
                "labels": { POOL_LABEL: null },
            }
        });
        match sandboxes
            .patch(
                &s.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&release),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(source) => {
                return Err(write(format!("the claimed Sandbox {}", s.name_any()))(
                    source,
                ));
            }
        }
    }
    let members: Vec<Member> = cached.iter().map(|s| member(s)).collect();
    expectations.observe(&members);
    match plan(pool.spec.replicas, &members, expectations) {
        PoolOp::Create(n) => {
            for _ in 0..n {
                let member_name = new_name(&name);
                expectations.creating.insert(member_name.clone());
                let created = sandboxes
                    .create(
                        &PostParams::default(),
                        &new_member(pool, member_name.clone()),
                    )
                    .await;
                if let Err(source) = created {
                    expectations.creating.remove(&member_name);
                    return Err(write(format!("a new Sandbox of pool {name}"))(source));
                }
            }
        }
        PoolOp::Delete(names) => {
            for member_name in names {
                expectations.deleting.insert(member_name.clone());
                match sandboxes
                    .delete(&member_name, &DeleteParams::default())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(source) => {
                        expectations.deleting.remove(&member_name);
                        return Err(write(format!("surplus Sandbox {member_name}"))(source));
                    }
                }
            }
        }
        PoolOp::Nothing => {}
    }
    let (replicas, ready) = counts(&members);
    let status = crate::k8s::crd::SandboxWarmPoolStatus {
        replicas,
        ready_replicas: ready,
        selector: format!("{POOL_LABEL}={name}"),
        observed_generation: pool.metadata.generation,
    };
    if pool.status.as_ref() != Some(&status) {
        pools
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "status": status })),
            )
            .await
            .map_err(write(format!("the status of pool {name}")))?;
    }
    // Members being made or readied change soon; a settled pool is woken by its watches.
    Ok(if ready < pool.spec.replicas {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(300)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::member::claim_order;

    fn m(name: &str, ready: bool, claimed: bool) -> Member {
        Member {
            name: name.into(),
            ready,
            claimed,
            deleting: false,
        }
    }

    #[test]
    fn creates_the_deficit_counting_creations_not_yet_seen() {
        let members = [m("a", true, false), m("b", true, true)];
        assert_eq!(
            plan(3, &members, &Expectations::default()),
            PoolOp::Create(2)
        );
        // After a restart or with a slow cache, the two creations already made are not repeated.
        let mut exp = Expectations::default();
        exp.creating.extend(["c".to_string(), "d".to_string()]);
        assert_eq!(plan(3, &members, &exp), PoolOp::Nothing);
        exp.observe(&[m("a", true, false), m("c", false, false)]);
        assert_eq!(exp.creating, BTreeSet::from(["d".to_string()]));
    }

    #[test]
    fn surplus_goes_unready_first_and_deletions_are_not_repeated() {
        let members = [
            m("a", true, false),
            m("b", false, false),
            m("c", true, false),
        ];
        assert_eq!(
            plan(1, &members, &Expectations::default()),
            PoolOp::Delete(vec!["b".into(), "c".into()])
        );
        let mut exp = Expectations::default();
        exp.deleting.insert("b".into());
        assert_eq!(plan(1, &members, &exp), PoolOp::Delete(vec!["c".into()]));
        assert_eq!(
            plan(0, &[m("x", true, true)], &exp),
            PoolOp::Nothing,
            "claimed ones are not the pool's"
        );
    }

    #[test]
    fn status_counts_and_claim_order() {
        let members = [
            m("a", true, false),
            m("b", false, false),
            m("c", true, true),
            m("d", true, false),
        ];
        assert_eq!(counts(&members), (3, 2));
        let mut order = claim_order(&members, 0);
        assert_eq!(
            order,
            claim_order(&members, 0),
            "the same seed, the same order"
        );
        order.sort();
        assert_eq!(order, vec!["a", "d"], "only ready, unclaimed ones");
        assert!(claim_order(&[m("c", true, true)], 5).is_empty());
        let many: Vec<Member> = (0..50).map(|i| m(&format!("s{i}"), true, false)).collect();
        let firsts: std::collections::BTreeSet<&str> =
            (0..20).map(|seed| claim_order(&many, seed)[0]).collect();
        assert!(
            firsts.len() > 10,
            "seeds spread claimers over the pool: {firsts:?}"
        );
    }
}
