//! Which Kafka topic an MQTT message goes to: ordered rules of MQTT topic filter -> Kafka
//! topic, first match wins, else the default topic.

use crate::config::RoutingConfig;

/// MQTT filter matching: `+` is one level, `#` (last) is any number of levels including none
/// (`a/#` matches `a`), and a topic starting with `$` is not matched by a filter starting
/// with a wildcard.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            literal => match topic_levels.next() {
                Some(t) if t == literal => {}
                _ => return false,
            },
        }
    }
    topic_levels.next().is_none()
}

/// Checks an MQTT topic filter: non-empty, `#` alone in the last level, `+` alone in its level.
pub fn validate_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("an MQTT topic filter must not be empty".to_owned());
    }
    if filter.contains('\0') {
        return Err("an MQTT topic filter must not contain U+0000".to_owned());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err(format!(
                "{filter:?}: '#' must be a whole level and the last one"
            ));
        }
        if level.contains('+') && *level != "+" {
            return Err(format!("{filter:?}: '+' must be a whole level"));
        }
    }
    Ok(())
}

/// Checks a Kafka topic name: 1 to 249 of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_kafka_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("a Kafka topic name must not be empty".to_owned());
    }
    if topic.len() > 249 {
        return Err(format!("Kafka topic name {topic:?} is longer than 249"));
    }
    if topic == "." || topic == ".." {
        return Err(format!("{topic:?} is not a valid Kafka topic name"));
    }
    if !topic
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "Kafka topic name {topic:?} may hold only letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// The routing rules, checked: which Kafka topic each MQTT topic goes to.
///
/// Named apart from the broker's `Router` (which hands messages to subscribers): this one
/// only maps topic names.
#[derive(Debug, Clone)]
pub struct TopicMap {
    rules: Vec<(String, String)>,
    default_topic: String,
}

impl TopicMap {
    pub fn new(config: &RoutingConfig) -> Self {
        TopicMap {
            rules: config
                .rules
                .iter()
                .map(|r| (r.filter.clone(), r.topic.clone()))
                .collect(),
            default_topic: config.default_topic.clone(),
        }
    }

    /// The Kafka topic of an MQTT topic.
    pub fn kafka_topic(&self, mqtt_topic: &str) -> &str {
        self.rules
            .iter()
            .find(|(filter, _)| filter_matches(filter, mqtt_topic))
            .map_or(self.default_topic.as_str(), |(_, topic)| topic.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteRule;

    #[test]
    fn matching() {
        let yes = [
            ("#", "a"),
            ("#", "a/b/c"),
            ("#", "/"),
            ("a/#", "a"),
            ("a/#", "a/b"),
            ("a/#", "a/b/c"),
            ("a/+", "a/b"),
            ("a/+", "a/"),
            ("+/+", "/"),
            ("+", ""),
            ("a/+/c", "a/b/c"),
            ("a/b", "a/b"),
            ("$SYS/#", "$SYS/x"),
            ("$SYS/+", "$SYS/x"),
            ("a//b", "a//b"),
            ("+/#", "a"),
        ];
        for (f, t) in yes {
            assert!(filter_matches(f, t), "{f} should match {t}");
        }
        let no = [
            ("a/+", "a"),
            ("a/+", "a/b/c"),
            ("a/b", "a/b/c"),
            ("a/b", "a"),
            ("#", "$SYS/x"),
            ("+/x", "$SYS/x"),
            ("a/#", "b"),
            ("a/#", "ab"),
            ("+", "a/b"),
            ("a/+/c", "a/b/d"),
        ];
        for (f, t) in no {
            assert!(!filter_matches(f, t), "{f} should not match {t}");
        }
    }

    #[test]
    fn filter_validation() {
        for ok in ["#", "+", "a/#", "a/+/b", "+/+/#", "/", "a//b"] {
            assert!(validate_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b+", "#/a", "a/++"] {
            assert!(validate_filter(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topic_validation() {
        assert!(validate_kafka_topic("mqtt.events_1-x").is_ok());
        for bad in ["", ".", "..", "a b", "a/b", &"x".repeat(250)] {
            assert!(validate_kafka_topic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn first_rule_wins_else_default() {
        let topics = TopicMap::new(&RoutingConfig {
            rules: vec![
                RouteRule {
                    filter: "sensors/+/temp".into(),
                    topic: "temps".into(),
                },
                RouteRule {
                    filter: "sensors/#".into(),
                    topic: "sensors".into(),
                },
                RouteRule {
                    filter: "#".into(),
                    topic: "rest".into(),
                },
            ],
            default_topic: "default".into(),
            ..Default::default()
        });
        assert_eq!(topics.kafka_topic("sensors/1/temp"), "temps");
        assert_eq!(topics.kafka_topic("sensors/1/humidity"), "sensors");
        assert_eq!(topics.kafka_topic("sensors"), "sensors");
        assert_eq!(topics.kafka_topic("other"), "rest");
        assert_eq!(topics.kafka_topic("$SYS/broker"), "default");
    }
}
