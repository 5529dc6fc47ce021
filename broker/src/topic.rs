//! MQTT topic names and filters: validation and matching.

/// Why a topic or filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicError {
    Empty,
    TooLong,
    TooManyLevels,
    WildcardInName,
    MisplacedWildcard,
    BadSharedSubscription,
}

/// A subscription filter as the client sent it, with `$share/<group>/` split off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    pub share_group: Option<&'a str>,
    pub filter: &'a str,
}

pub fn validate_topic_name(
    topic: &str,
    max_levels: usize,
    max_len: usize,
) -> Result<(), TopicError> {
    if topic.is_empty() {
        return Err(TopicError::Empty);
    }
    if topic.len() > max_len {
        return Err(TopicError::TooLong);
    }
    if topic.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    if topic.split('/').count() > max_levels {
        return Err(TopicError::TooManyLevels);
    }
    Ok(())
}

/// Validates a filter, including `$share/<group>/<filter>`.
pub fn parse_filter(
    raw: &str,
    max_levels: usize,
    max_len: usize,
) -> Result<ParsedFilter<'_>, TopicError> {
    if raw.is_empty() {
        return Err(TopicError::Empty);
    }
    if raw.len() > max_len {
        return Err(TopicError::TooLong);
    }
    let parsed = match raw.strip_prefix("$share/") {
        Some(rest) => {
            let (group, filter) = rest
                .split_once('/')
                .ok_or(TopicError::BadSharedSubscription)?;
            if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
                return Err(TopicError::BadSharedSubscription);
            }
            ParsedFilter {
                share_group: Some(group),
                filter,
            }
        }
        None => ParsedFilter {
            share_group: None,
            filter: raw,
        },
    };
    let levels: Vec<&str> = parsed.filter.split('/').collect();
    if levels.len() > max_levels {
        return Err(TopicError::TooManyLevels);
    }
    for (i, level) in levels.iter().enumerate() {
        let is_last = i + 1 == levels.len();
        match *level {
            "#" if !is_last => return Err(TopicError::MisplacedWildcard),
            "#" | "+" => {}
            other if other.contains(['+', '#']) => return Err(TopicError::MisplacedWildcard),
            _ => {}
        }
    }
    Ok(parsed)
}

/// Whether `topic` matches `filter` (both already valid; `filter` without `$share/`).
pub fn matches(filter: &str, topic: &str) -> bool {
    // `$` topics are for the server: wildcards at the first level must not reach them.
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_follows_the_spec_examples() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "a/b/c"));
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn dollar_topics_hide_from_leading_wildcards() {
        assert!(!matches("#", "$SYS/broker"));
        assert!(!matches("+/broker", "$SYS/broker"));
        assert!(matches("$SYS/#", "$SYS/broker"));
        assert!(matches("$SYS/+", "$SYS/broker"));
    }

    #[test]
    fn filters_are_validated() {
        assert!(parse_filter("a/#", 8, 100).is_ok());
        assert!(parse_filter("+/+/#", 8, 100).is_ok());
        assert_eq!(
            parse_filter("a/#/b", 8, 100),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(
            parse_filter("a/b#", 8, 100),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(
            parse_filter("a+/b", 8, 100),
            Err(TopicError::MisplacedWildcard)
        );
        assert_eq!(parse_filter("", 8, 100), Err(TopicError::Empty));
        assert_eq!(
            parse_filter("a/b/c", 2, 100),
            Err(TopicError::TooManyLevels)
        );
        let shared = parse_filter("$share/g1/a/+", 8, 100).expect("valid");
        assert_eq!(shared.share_group, Some("g1"));
        assert_eq!(shared.filter, "a/+");
        assert_eq!(
            parse_filter("$share/g1", 8, 100),
            Err(TopicError::BadSharedSubscription)
        );
        assert_eq!(
            parse_filter("$share//a", 8, 100),
            Err(TopicError::BadSharedSubscription)
        );
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_topic_name("a/b", 8, 100).is_ok());
        assert!(validate_topic_name("/", 8, 100).is_ok());
        assert_eq!(
            validate_topic_name("a/+", 8, 100),
            Err(TopicError::WildcardInName)
        );
        assert_eq!(validate_topic_name("", 8, 100), Err(TopicError::Empty));
        assert_eq!(
            validate_topic_name("a/b/c", 2, 100),
            Err(TopicError::TooManyLevels)
        );
    }
}
