//! MQTT topic filter matching (enough for deciding which subscriber should get which
//! publisher's messages) and the `{i}`/`{g}`/`{s}` templates used on the command line.

/// Does `filter` match `topic`? `+` matches one level, a trailing `#` the rest (including
/// the parent level itself); `$` topics are not matched by a leading wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Expands a template: `{i}` = index, `{g}` = index modulo `groups`, `{run}` = run id.
pub fn expand(template: &str, index: usize, groups: usize, run: &str) -> String {
    let group = index % groups.max(1);
    template
        .replace("{i}", &index.to_string())
        .replace("{s}", &index.to_string())
        .replace("{g}", &group.to_string())
        .replace("{run}", run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards() {
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(!matches("#", "$SYS/x"));
        assert!(matches("a/+/c", "a/b/c"));
        assert!(!matches("a/+/c", "a/b/d"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(matches("a/b", "a/b"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
    }

    #[test]
    fn templates() {
        assert_eq!(expand("b/{g}/{i}", 13, 10, "r"), "b/3/13");
        assert_eq!(expand("b/{run}/{s}/#", 2, 1, "xy"), "b/xy/2/#");
    }
}
