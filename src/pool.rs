//! The warm pool's index and its pure sizing function.
//!
//! It holds ready sandboxes per template and counts the ones starting; it decides how many to
//! start. Starting and stopping them is the caller's job: this module does no I/O.

use std::collections::{HashMap, VecDeque};

/// How many sandboxes to start so that ready + starting reaches the target. Never negative:
/// surplus is left to be claimed (a claimed sandbox leaves the pool anyway).
pub fn deficit(target: usize, ready: usize, starting: usize) -> usize {
    target.saturating_sub(ready + starting)
}

#[derive(Debug)]
pub struct PoolIndex<T> {
    ready: HashMap<String, VecDeque<T>>,
    starting: HashMap<String, usize>,
}

impl<T> Default for PoolIndex<T> {
    fn default() -> Self {
        PoolIndex {
            ready: HashMap::new(),
            starting: HashMap::new(),
        }
    }
}

impl<T> PoolIndex<T> {
    /// Takes the oldest ready sandbox of `template`.
    pub fn claim(&mut self, template: &str) -> Option<T> {
        self.ready.get_mut(template).and_then(VecDeque::pop_front)
    }

    /// Marks `n` sandboxes of `template` as starting; returns `n`.
    pub fn plan(&mut self, template: &str, target: usize) -> usize {
        let ready = self.ready.get(template).map_or(0, VecDeque::len);
        let starting = self.starting.entry(template.to_string()).or_insert(0);
        let n = deficit(target, ready, *starting);
        *starting += n;
        n
    }

    /// A start finished: the sandbox is ready (`Some`) or failed (`None`).
    pub fn started(&mut self, template: &str, sandbox: Option<T>) {
        if let Some(n) = self.starting.get_mut(template) {
            *n = n.saturating_sub(1);
        }
        if let Some(s) = sandbox {
            self.ready
                .entry(template.to_string())
                .or_default()
                .push_back(s);
        }
    }

    /// Adds a sandbox found ready (adopted after a restart).
    pub fn adopt(&mut self, template: &str, sandbox: T) {
        self.ready
            .entry(template.to_string())
            .or_default()
            .push_back(sandbox);
    }

    /// Removes ready sandboxes matching `gone` (they exited); returns them.
    pub fn remove_where(&mut self, mut gone: impl FnMut(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        for list in self.ready.values_mut() {
            let (dead, alive): (Vec<T>, Vec<T>) = list.drain(..).partition(|s| gone(s));
            *list = alive.into();
            out.extend(dead);
        }
        out
    }

    /// Every ready sandbox, emptying the pool (on shutdown).
    pub fn drain(&mut self) -> Vec<T> {
        self.ready.drain().flat_map(|(_, v)| v).collect()
    }

    pub fn ready_count(&self, template: &str) -> usize {
        self.ready.get(template).map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deficit_counts_ready_and_starting() {
        assert_eq!(deficit(3, 0, 0), 3);
        assert_eq!(deficit(3, 1, 1), 1);
        assert_eq!(deficit(3, 2, 2), 0);
        assert_eq!(deficit(0, 5, 0), 0);
    }

    #[test]
    fn planning_twice_does_not_over_create() {
        let mut p: PoolIndex<u32> = PoolIndex::default();
        assert_eq!(p.plan("echo", 2), 2);
        assert_eq!(p.plan("echo", 2), 0, "starting ones count");
        p.started("echo", Some(1));
        p.started("echo", None); // one failed
        assert_eq!(p.ready_count("echo"), 1);
        assert_eq!(p.plan("echo", 2), 1);
    }

    #[test]
    fn claims_are_first_in_first_out_and_removal_works() {
        let mut p: PoolIndex<u32> = PoolIndex::default();
        p.adopt("echo", 1);
        p.adopt("echo", 2);
        p.adopt("echo", 3);
        assert_eq!(p.remove_where(|s| *s == 2), vec![2]);
        assert_eq!(p.claim("echo"), Some(1));
        assert_eq!(p.claim("echo"), Some(3));
        assert_eq!(p.claim("echo"), None);
        assert_eq!(p.claim("other"), None);
    }
}
