//! Placement of models on nodes by rendezvous (highest-random-weight) hashing.
//!
//! Each node scores each model with SHA-256 of the pair; a model's owners are the k
//! nodes with the highest scores. Adding or removing one of N nodes therefore moves
//! only the models whose top-k set it enters or leaves, about k/N of them, and
//! shares stay close to even without virtual nodes.

use sha2::{Digest, Sha256};

use crate::ids::NodeId;

/// A set of live nodes, in a stable order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ring {
    nodes: Vec<NodeId>,
}

impl Ring {
    pub fn new(nodes: impl IntoIterator<Item = NodeId>) -> Self {
        let mut nodes: Vec<NodeId> = nodes.into_iter().collect();
        nodes.sort();
        nodes.dedup();
        Self { nodes }
    }

    pub fn nodes(&self) -> &[NodeId] {
        &self.nodes
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Returns every node in preference order for `key`: the owner first.
    pub fn ranked(&self, key: &str) -> Vec<&NodeId> {
        let mut scored: Vec<(u64, &NodeId)> = self
            .nodes
            .iter()
            .map(|node| (score(node, key), node))
            .collect();
        scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        scored.into_iter().map(|(_, node)| node).collect()
    }

    /// Returns the `replicas` nodes that own `key` (fewer if the ring is smaller).
    pub fn owners(&self, key: &str, replicas: usize) -> Vec<&NodeId> {
        let mut ranked = self.ranked(key);
        ranked.truncate(replicas.max(1));
        ranked
    }

    /// Returns the first owner of `key`, or `None` on an empty ring.
    pub fn owner(&self, key: &str) -> Option<&NodeId> {
        self.nodes
            .iter()
            .max_by(|a, b| score(a, key).cmp(&score(b, key)).then_with(|| b.cmp(a)))
    }
}

fn score(node: &NodeId, key: &str) -> u64 {
    let mut hasher = Sha256::new();
    hasher.update(node.as_str().as_bytes());
    hasher.update([0u8]);
    hasher.update(key.as_bytes());
    let digest = hasher.finalize();
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(prefix)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn ring_of(count: usize) -> Ring {
        Ring::new((0..count).map(|i| NodeId::new(format!("coordinator-{i}"))))
    }

    fn models(count: usize) -> Vec<String> {
        (0..count).map(|i| format!("org/model-{i}")).collect()
    }

    #[test]
    fn owner_is_first_ranked() {
        let ring = ring_of(5);
        for model in models(100) {
            assert_eq!(ring.owner(&model), Some(ring.ranked(&model)[0]));
        }
    }

    #[test]
    fn replicas_are_distinct_nodes() {
        let ring = ring_of(5);
        let owners = ring.owners("org/hot-model", 3);
        assert_eq!(owners.len(), 3);
        assert_ne!(owners[0], owners[1]);
        assert_ne!(owners[1], owners[2]);
        assert_ne!(owners[0], owners[2]);
        assert_eq!(ring_of(2).owners("org/hot-model", 3).len(), 2);
    }

    #[test]
    fn adding_node_moves_about_one_in_n() {
        for count in [3, 10, 50] {
            let before = ring_of(count);
            let after = ring_of(count + 1);
            let all = models(1000);
            let moved = all
                .iter()
                .filter(|model| before.owner(model) != after.owner(model))
                .count();
            let expected = 1000 / (count + 1);
            assert!(
                moved <= expected * 3 / 2 + 10,
                "{moved} of 1000 models moved going from {count} nodes, expected about {expected}"
            );
            // Every moved model moved to the new node.
            let new_node = NodeId::new(format!("coordinator-{count}"));
            for model in &all {
                if before.owner(model) != after.owner(model) {
                    assert_eq!(after.owner(model), Some(&new_node));
                }
            }
        }
    }

    #[test]
    fn shares_are_close_to_even() {
        for count in [3, 10] {
            let ring = ring_of(count);
            let mut shares: HashMap<&NodeId, usize> = HashMap::new();
            let all = models(1000);
            for model in &all {
                *shares.entry(ring.owner(model).unwrap()).or_default() += 1;
            }
            let even = 1000 / count;
            for (node, share) in shares {
                assert!(
                    share.abs_diff(even) <= even / 4,
                    "{node} owns {share} of 1000 models, even would be {even}"
                );
            }
        }
    }

    /// With 1,000 models the shares of N nodes vary like a fair draw: their
    /// standard deviation stays near the binomial one, and no node gets more than
    /// twice the even share. For 50 nodes that is 20 ± 4.4 models.
    #[test]
    fn shares_spread_like_fair_draw() {
        for count in [3usize, 10, 50] {
            let ring = ring_of(count);
            let mut shares: HashMap<&NodeId, usize> = HashMap::new();
            let all = models(1000);
            for model in &all {
                *shares.entry(ring.owner(model).unwrap()).or_default() += 1;
            }
            let even = 1000.0 / count as f64;
            let variance = ring
                .nodes()
                .iter()
                .map(|node| {
                    let share = *shares.get(node).unwrap_or(&0) as f64;
                    (share - even).powi(2)
                })
                .sum::<f64>()
                / count as f64;
            let p = 1.0 / count as f64;
            let binomial = (1000.0 * p * (1.0 - p)).sqrt();
            assert!(
                variance.sqrt() <= 1.5 * binomial,
                "{count} nodes: standard deviation {:.1} against {binomial:.1} for a fair draw",
                variance.sqrt()
            );
            for (node, share) in &shares {
                assert!(
                    *share as f64 <= 2.0 * even,
                    "{node} owns {share}, even is {even}"
                );
            }
        }
    }

    #[test]
    fn removing_node_moves_only_its_models() {
        for count in [3, 10, 50] {
            let before = ring_of(count);
            let removed = NodeId::new("coordinator-0");
            let after = Ring::new(
                before
                    .nodes()
                    .iter()
                    .filter(|node| **node != removed)
                    .cloned(),
            );
            for model in models(1000) {
                if before.owner(&model) != Some(&removed) {
                    assert_eq!(
                        before.owner(&model),
                        after.owner(&model),
                        "{model} moved without cause"
                    );
                }
            }
        }
    }

    #[test]
    fn empty_ring_has_no_owner() {
        assert_eq!(Ring::default().owner("m"), None);
        assert!(Ring::default().ranked("m").is_empty());
    }
}
