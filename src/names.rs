//! Names and label values derived from user-chosen names, kept within Kubernetes' limits.
//!
//! A BackgroundJob name may be up to 253 characters, but a label value may have at most 63, and names built from a
//! job name (`<job>-<attempt>` Pods, `<definition>-<tick>` jobs) add a suffix. Whatever is too long is shortened
//! the same way everywhere: a readable prefix plus a stable hash of the whole, so distinct names stay distinct.

/// Longest label value Kubernetes accepts.
pub const MAX_LABEL_VALUE: usize = 63;
/// Longest object name (DNS subdomain).
pub const MAX_NAME: usize = 253;

/// Whether `s` is a valid object name (a DNS-1123 subdomain: at most 253 characters of lowercase letters, digits,
/// `-` and `.`, starting and ending with a letter or digit). Names from outside (a report token) are checked with
/// this before they go into an apiserver path.
pub fn is_dns1123_subdomain(s: &str) -> bool {
    // Dot-separated labels, each of lowercase letters, digits and `-`, starting and ending with a letter or digit.
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let label = |l: &str| {
        edge(l.chars().next())
            && edge(l.chars().last())
            && l.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    };
    s.len() <= 253 && s.split('.').all(label)
}

/// Whether `key` is a valid label or annotation key: an optional prefix (a DNS subdomain) and `/`, then a name of at
/// most 63 letters, digits, `-`, `_` and `.`, starting and ending with a letter or digit.
pub fn is_qualified_name(key: &str) -> bool {
    let (prefix, name) = key.rsplit_once('/').map_or((None, key), |(p, n)| (Some(p), n));
    prefix.is_none_or(is_dns1123_subdomain) && !name.is_empty() && is_label_value(name)
}

/// Whether `value` is a valid label value: empty, or at most 63 letters, digits, `-`, `_` and `.`, starting and
/// ending with a letter or digit.
pub fn is_label_value(value: &str) -> bool {
    let edge = |c: Option<char>| c.is_none_or(|c| c.is_ascii_alphanumeric());
    value.len() <= MAX_LABEL_VALUE
        && edge(value.chars().next())
        && edge(value.chars().last())
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// `value` as a label value: itself when it fits, otherwise a prefix and a hash (always valid).
pub fn label_value(value: &str) -> String {
    shorten(value, MAX_LABEL_VALUE)
}

/// `base` followed by `suffix`, shortened (in `base`) to fit `limit` characters.
pub fn with_suffix(base: &str, suffix: &str, limit: usize) -> String {
    if base.len() + suffix.len() <= limit {
        return format!("{base}{suffix}");
    }
    format!("{}{suffix}", shorten(base, limit.saturating_sub(suffix.len())))
}

/// `value` itself when at most `limit` characters long, else a readable prefix, `-`, and 16 hex digits of a hash
/// of the whole value. The result starts and ends with an alphanumeric character (label and DNS rules).
fn shorten(value: &str, limit: usize) -> String {
    if value.len() <= limit {
        return value.to_string();
    }
    let hash = format!("{:016x}", crate::members::stable_hash(&[value]));
    let keep = limit.saturating_sub(hash.len() + 1);
    let prefix: String = value.chars().take(keep).collect();
    let prefix = prefix.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if prefix.is_empty() { hash } else { format!("{prefix}-{hash}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_valid_label_keys_and_values_pass() {
        for good in ["team", "app.kubernetes.io/name", "a_b.c-d", "x/Y1", &"a".repeat(63)] {
            assert!(is_qualified_name(good), "{good:?}");
        }
        for bad in
            ["", "/a", "a/", "A/b", "a/b/c", "-a", "a b", "ü", &"a".repeat(64), &format!("{}/a", "a".repeat(254))]
        {
            assert!(!is_qualified_name(bad), "{bad:?}");
        }
        for good in ["", "eu", "payments.eu_1-a", &"a".repeat(63)] {
            assert!(is_label_value(good), "{good:?}");
        }
        for bad in ["payments/eu", "-a", "a-", "a b", "ü", &"a".repeat(64)] {
            assert!(!is_label_value(bad), "{bad:?}");
        }
    }

    #[test]
    fn only_valid_object_names_pass() {
        assert!(is_dns1123_subdomain("report-1.a"));
        for bad in ["", "..", "a..b", "a.-b", "a-.b", ".a", "a.", "a/b", "A", "-a", "a-", "a?x=1", &"a".repeat(254)] {
            assert!(!is_dns1123_subdomain(bad), "{bad:?}");
        }
    }

    #[test]
    fn short_values_are_kept_as_they_are() {
        assert_eq!(label_value("send-newsletter"), "send-newsletter");
        assert_eq!(with_suffix("j", "-1", MAX_NAME), "j-1");
    }

    #[test]
    fn long_values_become_a_prefix_and_a_hash_within_the_limit() {
        let long = "a".repeat(71);
        let v = label_value(&long);
        assert_eq!(v.len(), MAX_LABEL_VALUE);
        assert!(v.starts_with("aaaa") && v.chars().last().unwrap().is_ascii_alphanumeric());
        assert_ne!(label_value(&format!("{long}b")), v, "distinct names stay distinct");
        assert_eq!(label_value(&long), v, "stable");
    }

    #[test]
    fn a_prefix_never_ends_in_a_separator() {
        let v = label_value(&format!("{}.-x{}", "a".repeat(44), "y".repeat(30)));
        assert!(!v.contains(".-"), "{v}");
    }

    #[test]
    fn suffixed_names_fit_their_limit() {
        let n = with_suffix(&"d".repeat(253), "-1764500000", MAX_NAME);
        assert_eq!(n.len(), MAX_NAME);
        assert!(n.ends_with("-1764500000"));
    }
}
