//! Authorization: ordered allow/deny rules on topic filters.
//!
//! The first rule whose action, user and client id fit and whose filter matches decides;
//! without one, `default` does. `%u` and `%c` in a rule's filter stand for the client's
//! username and client id. Subscriptions are checked when made (against the requested
//! filter) and again for every message delivered (against its topic), so a broad
//! subscription such as `#` never leaks what a deny rule covers.

use serde::{Deserialize, Serialize};

use crate::topic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Publish,
    Subscribe,
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    pub permission: Permission,
    pub action: Action,
    pub filter: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AclConfig {
    pub default: Permission,
    pub rules: Vec<AclRule>,
}

impl Default for AclConfig {
    fn default() -> Self {
        AclConfig {
            default: Permission::Allow,
            rules: Vec::new(),
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone, Copy)]
pub struct Principal<'a> {
    pub username: Option<&'a str>,
    pub client_id: &'a str,
}

impl AclConfig {
    pub fn validate(&self) -> Result<(), String> {
        for (i, rule) in self.rules.iter().enumerate() {
            let probe = rule.filter.replace("%u", "u").replace("%c", "c");
            topic::parse_filter(&probe, usize::MAX, usize::MAX)
                .map_err(|e| format!("rule {} filter {:?}: {e:?}", i + 1, rule.filter))?;
        }
        Ok(())
    }

    /// True when no rule can ever deny: the per-message check can be skipped.
    pub fn allows_everything(&self) -> bool {
        self.default == Permission::Allow
            && self.rules.iter().all(|r| r.permission == Permission::Allow)
    }

    /// Decides `action` on `topic` (a topic name, or for subscriptions the requested filter,
    /// whose `+` and `#` levels are then compared literally).
    pub fn check(&self, who: Principal<'_>, action: Action, topic: &str) -> Permission {
        for rule in &self.rules {
            if rule.action != Action::All && rule.action != action {
                continue;
            }
            if let Some(user) = &rule.username {
                if who.username != Some(user.as_str()) {
                    continue;
                }
            }
            if let Some(client_id) = &rule.client_id {
                if who.client_id != client_id {
                    continue;
                }
            }
            let filter = if rule.filter.contains('%') {
                std::borrow::Cow::Owned(
                    rule.filter
                        .replace("%u", who.username.unwrap_or("\u{0}"))
                        .replace("%c", who.client_id),
                )
            } else {
                std::borrow::Cow::Borrowed(rule.filter.as_str())
            };
            if topic::matches(&filter, topic) {
                return rule.permission;
            }
        }
        self.default
    }

    pub fn allowed(&self, who: Principal<'_>, action: Action, topic: &str) -> bool {
        self.check(who, action, topic) == Permission::Allow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(rules: &[(Permission, Action, &str)]) -> AclConfig {
        AclConfig {
            default: Permission::Allow,
            rules: rules
                .iter()
                .map(|(p, a, f)| AclRule {
                    permission: *p,
                    action: *a,
                    filter: (*f).to_owned(),
                    username: None,
                    client_id: None,
                })
                .collect(),
        }
    }

    const ALICE: Principal<'static> = Principal {
        username: Some("alice"),
        client_id: "c1",
    };

    #[test]
    fn first_matching_rule_wins() {
        let acl = acl(&[
            (Permission::Allow, Action::Publish, "secret/public"),
            (Permission::Deny, Action::All, "secret/#"),
        ]);
        assert!(acl.allowed(ALICE, Action::Publish, "secret/public"));
        assert!(!acl.allowed(ALICE, Action::Publish, "secret/x"));
        assert!(!acl.allowed(ALICE, Action::Subscribe, "secret/public"));
        assert!(acl.allowed(ALICE, Action::Subscribe, "other"));
    }

    #[test]
    fn placeholders_expand() {
        let mut acl = acl(&[(Permission::Allow, Action::All, "users/%u/#")]);
        acl.default = Permission::Deny;
        assert!(acl.allowed(ALICE, Action::Publish, "users/alice/x"));
        assert!(!acl.allowed(ALICE, Action::Publish, "users/bob/x"));
        let anonymous = Principal {
            username: None,
            client_id: "c1",
        };
        assert!(!acl.allowed(anonymous, Action::Publish, "users//x"));
    }

    #[test]
    fn wildcard_subscriptions_are_compared_literally() {
        let acl = acl(&[(Permission::Deny, Action::Subscribe, "secret/#")]);
        assert!(!acl.allowed(ALICE, Action::Subscribe, "secret/+"));
        // `#` itself is allowed; the per-message check then filters what it receives.
        assert!(acl.allowed(ALICE, Action::Subscribe, "#"));
        assert!(!acl.allows_everything());
    }

    #[test]
    fn invalid_rule_filters_are_rejected() {
        let acl = acl(&[(Permission::Deny, Action::All, "a/#/b")]);
        assert!(acl.validate().is_err());
    }
}
