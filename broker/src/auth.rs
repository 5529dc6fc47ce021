//! Authorization: ordered allow/deny rules on topic filters.
//!
//! The first rule whose action, user and client id fit and whose filter matches decides;
//! without one, `default` does. `%u` and `%c` in a rule's filter stand for the client's
//! username and client id. Subscriptions are checked when made (against the requested
//! filter) and again for every message delivered (against its topic), so a broad
//! subscription such as `#` never leaks what a deny rule covers.
//!
//! Placeholders are filled in once, left to right (a username holding `%c` is not expanded
//! again), and only with identities that cannot change the filter's shape: a username or
//! client id that is missing, empty, or holds `+`, `#`, `/` or NUL would turn
//! `devices/%u/#` into `devices/+/#` (everyone's tree), `devices/#/#` or `devices/a/b/#`
//! (someone else's). Such an identity fails closed (see [`AclConfig::check`]): an allow rule
//! using its placeholder never matches, a deny rule using it matches every topic. This is
//! done here, at the substitution, so every source of the identity is covered: the CONNECT
//! username and client id, a certificate name (`tls.username_from_cert`) and a JWT claim.
//! Mosquitto made the same change for CVE-2017-7650.

use jetmq_common::settings::InvalidSetting;

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

/// True when `value` can be pasted into a topic filter as (part of) one literal level: not
/// empty, no level separator, no wildcard, no NUL.
pub fn safe_in_filter(value: &str) -> bool {
    !value.is_empty() && !value.contains(['+', '#', '/', '\0'])
}

/// A rule's filter with `%u` and `%c` filled in, in one pass. None when a placeholder it
/// uses has no safe value for `who` (see [`safe_in_filter`]).
fn expand<'f>(filter: &'f str, who: Principal<'_>) -> Option<std::borrow::Cow<'f, str>> {
    if !filter.contains('%') {
        return Some(std::borrow::Cow::Borrowed(filter));
    }
    let mut out = String::with_capacity(filter.len() + 16);
    let mut rest = filter;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let value = match after.as_bytes().first() {
            Some(b'u') => Some(who.username.unwrap_or("")),
            Some(b'c') => Some(who.client_id),
            _ => None,
        };
        match value {
            Some(v) if safe_in_filter(v) => {
                out.push_str(v);
                rest = &after[1..];
            }
            Some(_) => return None,
            None => {
                out.push('%');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    Some(std::borrow::Cow::Owned(out))
}

impl AclConfig {
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        for (i, rule) in self.rules.iter().enumerate() {
            let probe = rule.filter.replace("%u", "u").replace("%c", "c");
            topic::parse_filter(&probe, usize::MAX, usize::MAX).map_err(|e| {
                InvalidSetting::new(
                    "acl.rules",
                    format!("rule {} filter {:?}: {e:?}", i + 1, rule.filter),
                )
            })?;
        }
        Ok(())
    }

    /// True when no rule can ever deny: the per-message check can be skipped.
    pub fn allows_everything(&self) -> bool {
        self.default == Permission::Allow
            && self.rules.iter().all(|r| r.permission == Permission::Allow)
    }

    /// Which of the client's identities the rules would paste into a filter but cannot,
    /// because it is missing, empty or holds `+`, `#`, `/` or NUL (for the log at CONNECT:
    /// such a client gets none of the allow rules and all of the deny rules that use it).
    pub fn unsafe_placeholders(&self, who: Principal<'_>) -> Vec<&'static str> {
        let mut out = Vec::new();
        let uses = |p: &str| self.rules.iter().any(|r| r.filter.contains(p));
        if uses("%u") && !who.username.is_some_and(safe_in_filter) {
            out.push("username");
        }
        if uses("%c") && !safe_in_filter(who.client_id) {
            out.push("client id");
        }
        out
    }

    /// Decides `action` on `topic` (a topic name, or for subscriptions the requested filter,
    /// whose `+` and `#` levels are then compared literally).
    ///
    /// A rule whose placeholder cannot be filled in safely for `who` fails closed: an allow
    /// rule does not match, a deny rule matches whatever the topic.
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
            let Some(filter) = expand(&rule.filter, who) else {
                match rule.permission {
                    Permission::Allow => continue,
                    Permission::Deny => return Permission::Deny,
                }
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

    fn who<'a>(username: Option<&'a str>, client_id: &'a str) -> Principal<'a> {
        Principal {
            username,
            client_id,
        }
    }

    #[test]
    fn wildcard_identities_never_widen_an_allow_rule() {
        let mut acl = acl(&[
            (Permission::Allow, Action::All, "devices/%u/#"),
            (Permission::Allow, Action::All, "clients/%c/#"),
        ]);
        acl.default = Permission::Deny;
        let bob = who(Some("bob"), "bob-1");
        assert!(acl.allowed(bob, Action::Subscribe, "devices/bob/#"));
        assert!(acl.allowed(bob, Action::Publish, "clients/bob-1/cmd"));
        for name in ["+", "#", "a/b", "", "\0", "+/#", "bob/+", "x#"] {
            let attacker = who(Some(name), name);
            for (action, topic) in [
                (Action::Publish, "devices/bob/cmd"),
                (Action::Subscribe, "devices/bob/#"),
                (Action::Subscribe, "devices/+/#"),
                (Action::Subscribe, "devices/#"),
                (Action::Publish, "clients/bob-1/cmd"),
                (Action::Subscribe, "clients/+/cmd"),
                (Action::Subscribe, "clients/#"),
                (Action::Publish, "devices/a/b/x"),
                (Action::Publish, "devices//x"),
            ] {
                assert!(
                    !acl.allowed(attacker, action, topic),
                    "{name:?} {action:?} {topic}"
                );
            }
        }
        // No username at all: %u has nothing to stand for.
        assert!(!acl.allowed(who(None, "c"), Action::Publish, "devices//x"));
        assert!(!acl.allowed(who(None, "c"), Action::Subscribe, "devices/#"));
        assert_eq!(
            acl.unsafe_placeholders(who(Some("+"), "#")),
            ["username", "client id"]
        );
        assert_eq!(acl.unsafe_placeholders(who(None, "c")), ["username"]);
        assert!(acl.unsafe_placeholders(bob).is_empty());
    }

    #[test]
    fn unsafe_identities_get_every_deny_rule_using_them() {
        let acl = acl(&[
            (Permission::Deny, Action::Publish, "devices/%u/config"),
            (Permission::Allow, Action::All, "#"),
        ]);
        assert!(!acl.allowed(ALICE, Action::Publish, "devices/alice/config"));
        assert!(acl.allowed(ALICE, Action::Publish, "devices/bob/config"));
        let attacker = who(Some("+"), "c");
        // With `+` pasted in, the deny would still cover only one level; fail closed instead.
        assert!(!acl.allowed(attacker, Action::Publish, "devices/alice/config"));
        assert!(!acl.allowed(attacker, Action::Publish, "anything"));
        // Subscribing is not what the deny rule is about.
        assert!(acl.allowed(attacker, Action::Subscribe, "devices/alice/config"));
    }

    #[test]
    fn placeholders_are_filled_in_once() {
        let mut acl = acl(&[(Permission::Allow, Action::All, "devices/%u/#")]);
        acl.default = Permission::Deny;
        // A username that itself reads "%c" is literal, not the client id.
        let tricky = who(Some("%c"), "bob");
        assert!(!acl.allowed(tricky, Action::Publish, "devices/bob/x"));
        assert!(acl.allowed(tricky, Action::Publish, "devices/%c/x"));
        // A % that is no placeholder stays as it is.
        let acl = {
            let mut a = self::acl(&[(Permission::Allow, Action::All, "100%/%u/%x")]);
            a.default = Permission::Deny;
            a
        };
        assert!(acl.allowed(ALICE, Action::Publish, "100%/alice/%x"));
        assert_eq!(expand("a/%", ALICE).as_deref(), Some("a/%"));
        assert_eq!(expand("%c%u", ALICE).as_deref(), Some("c1alice"));
    }

    #[test]
    fn invalid_rule_filters_are_rejected() {
        let acl = acl(&[(Permission::Deny, Action::All, "a/#/b")]);
        assert!(acl.validate().is_err());
    }
}
