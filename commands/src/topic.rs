//! Subscription topics: `/project/<id>/<eventType>`, as in the Renku design.

use std::fmt;

/// A parsed topic. `project` is GitLab's id (a number, or a URL-encoded path such as `group%2Fname`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Topic {
    pub project: String,
    pub event_type: String,
}

/// The form a topic must have, quoted in every parse error.
pub const TOPIC_FORM: &str = "/project/<id>/<eventType>";

const MAX_PART: usize = 200;

impl Topic {
    /// Parses `/project/<id>/<eventType>`. The error names the expected form.
    pub fn parse(s: &str) -> Result<Topic, String> {
        let bad = |why: &str| format!("invalid topic: {why}; expected {TOPIC_FORM}");
        let rest = s
            .strip_prefix("/project/")
            .ok_or_else(|| bad("it must start with /project/"))?;
        let (project, event_type) = rest
            .split_once('/')
            .ok_or_else(|| bad("the event type is missing"))?;
        let valid = |part: &str, extra: &[char]| {
            !part.is_empty()
                && part.len() <= MAX_PART
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c) || extra.contains(&c))
        };
        if !valid(project, &['%']) {
            return Err(bad(
                "the project id must be 1-200 characters of [A-Za-z0-9_.%-]",
            ));
        }
        if !valid(event_type, &[]) {
            return Err(bad(
                "the event type must be 1-200 characters of [A-Za-z0-9_.-]",
            ));
        }
        Ok(Topic {
            project: project.to_owned(),
            event_type: event_type.to_owned(),
        })
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "/project/{}/{}", self.project, self.event_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let t = Topic::parse("/project/42/pipeline").unwrap();
        assert_eq!(t.project, "42");
        assert_eq!(t.event_type, "pipeline");
        assert_eq!(t.to_string(), "/project/42/pipeline");
        assert!(Topic::parse("/project/group%2Fname/push").is_ok());
    }

    proptest::proptest! {
        /// Any string a peer sends is a topic that prints back to itself, or an error naming the form.
        #[test]
        fn any_string_parses_or_explains(s in ".{0,80}") {
            match Topic::parse(&s) {
                Ok(t) => proptest::prop_assert_eq!(t.to_string(), s),
                Err(e) => proptest::prop_assert!(e.contains(TOPIC_FORM)),
            }
        }

        #[test]
        fn topic_shaped_strings(p in "[a-z0-9%]{0,5}", t in "[a-z_/]{0,6}") {
            let s = format!("/project/{p}/{t}");
            match Topic::parse(&s) {
                Ok(topic) => proptest::prop_assert_eq!(topic.to_string(), s),
                Err(e) => proptest::prop_assert!(e.contains(TOPIC_FORM)),
            }
        }
    }

    #[test]
    fn refuses_malformed() {
        for bad in [
            "",
            "/project/42",
            "/project//x",
            "/project/42/",
            "/projects/42/x",
            "/project/4 2/x",
            "/project/42/a/b",
        ] {
            let e = Topic::parse(bad).unwrap_err();
            assert!(e.contains(TOPIC_FORM), "{bad}: {e}");
        }
    }
}
