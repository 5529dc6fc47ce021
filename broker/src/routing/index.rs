//! The node's subscription index: a trie over topic levels.
//!
//! Leaves hold, per filter, the local sessions subscribed with it. Matching a topic walks
//! the trie once, following the literal level, `+` and `#` children.

use std::collections::HashMap;

use jetmq_codec::QoS;

/// A node-local session handle id.
pub type SessionKey = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubEntry {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub subscription_id: Option<u32>,
    /// Messages up to this stream sequence were stored before the SUBSCRIBE that made this
    /// entry, and are not for it even if the router reads them after (0: no floor).
    pub after_seq: u64,
}

#[derive(Default, Debug)]
struct TrieNode {
    children: HashMap<Box<str>, TrieNode>,
    subscribers: HashMap<SessionKey, SubEntry>,
}

impl TrieNode {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty()
    }
}

#[derive(Default, Debug)]
pub struct SubscriptionIndex {
    root: TrieNode,
    len: usize,
}

/// One match: which session, with which subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Match {
    pub session: SessionKey,
    pub entry: SubEntry,
}

impl SubscriptionIndex {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds or replaces `session`'s subscription to `filter`.
    pub fn insert(&mut self, filter: &str, session: SessionKey, entry: SubEntry) {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.subscribers.insert(session, entry).is_none() {
            self.len += 1;
        }
    }

    /// Removes `session`'s subscription to `filter`; true if there was one.
    pub fn remove(&mut self, filter: &str, session: SessionKey) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove_at(&mut self.root, &levels, session);
        if removed {
            self.len -= 1;
        }
        removed
    }

    fn remove_at(node: &mut TrieNode, levels: &[&str], session: SessionKey) -> bool {
        match levels.split_first() {
            None => node.subscribers.remove(&session).is_some(),
            Some((level, rest)) => {
                let Some(child) = node.children.get_mut(*level) else {
                    return false;
                };
                let removed = Self::remove_at(child, rest, session);
                if child.is_empty() {
                    node.children.remove(*level);
                }
                removed
            }
        }
    }

    /// Every subscription matching `topic`, in no particular order.
    pub fn matches(&self, topic: &str, out: &mut Vec<Match>) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        Self::collect(&self.root, &levels, 0, dollar, out);
    }

    fn collect(node: &TrieNode, levels: &[&str], depth: usize, dollar: bool, out: &mut Vec<Match>) {
        let wildcards_allowed = !(dollar && depth == 0);
        if wildcards_allowed {
            if let Some(hash) = node.children.get("#") {
                push_all(hash, out);
            }
        }
        let Some((level, rest)) = levels.split_first() else {
            push_all(node, out);
            return;
        };
        if let Some(child) = node.children.get(*level) {
            Self::collect(child, rest, depth + 1, dollar, out);
        }
        if wildcards_allowed {
            if let Some(plus) = node.children.get("+") {
                Self::collect(plus, rest, depth + 1, dollar, out);
            }
        }
    }
}

fn push_all(node: &TrieNode, out: &mut Vec<Match>) {
    out.extend(node.subscribers.iter().map(|(session, entry)| Match {
        session: *session,
        entry: *entry,
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic;
    use proptest::prelude::*;

    fn entry() -> SubEntry {
        SubEntry {
            qos: QoS::AtLeastOnce,
            no_local: false,
            retain_as_published: false,
            subscription_id: None,
            after_seq: 0,
        }
    }

    fn sessions(index: &SubscriptionIndex, topic: &str) -> Vec<SessionKey> {
        let mut out = Vec::new();
        index.matches(topic, &mut out);
        let mut keys: Vec<_> = out.into_iter().map(|m| m.session).collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn wildcards_and_parents() {
        let mut index = SubscriptionIndex::default();
        index.insert("a/#", 1, entry());
        index.insert("a/+/c", 2, entry());
        index.insert("#", 3, entry());
        index.insert("a/b/c", 4, entry());
        assert_eq!(sessions(&index, "a"), vec![1, 3]);
        assert_eq!(sessions(&index, "a/b/c"), vec![1, 2, 3, 4]);
        assert_eq!(sessions(&index, "$SYS/a"), Vec::<u64>::new());
        assert!(index.remove("a/#", 1));
        assert!(!index.remove("a/#", 1));
        assert_eq!(sessions(&index, "a"), vec![3]);
        assert_eq!(index.len(), 3);
    }

    proptest! {
        #[test]
        fn index_agrees_with_matches(
            filters in proptest::collection::vec("(\\$?[ab+]|#|)(/([ab+]|#|)){0,3}", 1..12),
            topic in "\\$?[ab]{0,1}(/[ab]{0,1}){0,3}",
        ) {
            let mut index = SubscriptionIndex::default();
            let mut expected = Vec::new();
            for (i, filter) in filters.iter().enumerate() {
                if topic::parse_filter(filter, 16, 100).is_err() {
                    continue;
                }
                index.insert(filter, i as u64, entry());
                if topic::matches(filter, &topic) {
                    expected.push(i as u64);
                }
            }
            prop_assert_eq!(sessions(&index, &topic), expected);
        }
    }
}
