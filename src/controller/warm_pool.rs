//! Pure decisions for a `SandboxWarmPool`: how many sandboxes to create or which to delete, from
//! the members the watch cache shows plus the writes made but not yet observed (expectations), so
//! a slow cache or a restart never over-creates; and the pool's status. Also the choice of a
//! claim candidate. No I/O.

use std::collections::BTreeSet;

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

#[cfg(test)]
mod tests {
    use super::*;

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
