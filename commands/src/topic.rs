//! Subscription topics. Two kinds:
//! - `/project/<id>/<eventType>`: a GitLab project's events (the Renku design), streamed from GitLab;
//! - any other path such as `/events/orders`: a *channel*, fed only by backends through the publish API. Which
//!   prefixes are accepted is the engine's configuration (`publish.namespaces`).

use std::fmt;

/// A parsed topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// `project` is GitLab's id (a number, or a URL-encoded path such as `group%2Fname`).
    Project { project: String, event_type: String },
    /// A publish-only channel, kept as written (`/events/orders`).
    Channel(String),
}

/// The forms a topic may have, quoted in every parse error.
pub const TOPIC_FORM: &str = "/project/<id>/<eventType> or a channel path such as /events/<name>";

const MAX_PART: usize = 200;

fn valid(part: &str, extra: &[char]) -> bool {
    !part.is_empty()
        && part.len() <= MAX_PART
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c) || extra.contains(&c))
}

impl Topic {
    /// Parses a topic. The error names the expected forms.
    pub fn parse(s: &str) -> Result<Topic, String> {
        let bad = |why: &str| format!("invalid topic: {why}; expected {TOPIC_FORM}");
        if let Some(rest) = s.strip_prefix("/project/") {
            let (project, event_type) = rest
                .split_once('/')
                .ok_or_else(|| bad("the event type is missing"))?;
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
            return Ok(Topic::Project {
                project: project.to_owned(),
                event_type: event_type.to_owned(),
            });
        }
        let rest = s
            .strip_prefix('/')
            .ok_or_else(|| bad("it must start with /"))?;
        if s.len() > MAX_PART || !rest.split('/').all(|seg| valid(seg, &[])) || s == "/project" {
            return Err(bad(
                "a channel is /-separated segments of [A-Za-z0-9_.-], at most 200 characters",
            ));
        }
        Ok(Topic::Channel(s.to_owned()))
    }

    /// A project topic.
    pub fn project(project: &str, event_type: &str) -> Topic {
        Topic::Project {
            project: project.to_owned(),
            event_type: event_type.to_owned(),
        }
    }

    /// The project, for project topics.
    pub fn project_id(&self) -> Option<&str> {
        match self {
            Topic::Project { project, .. } => Some(project),
            Topic::Channel(_) => None,
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::Project {
                project,
                event_type,
            } => write!(f, "/project/{project}/{event_type}"),
            Topic::Channel(c) => f.write_str(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let t = Topic::parse("/project/42/pipeline").unwrap();
        assert_eq!(t, Topic::project("42", "pipeline"));
        assert_eq!(t.to_string(), "/project/42/pipeline");
        assert!(Topic::parse("/project/group%2Fname/push").is_ok());
        assert_eq!(
            Topic::parse("/events/orders.eu").unwrap(),
            Topic::Channel("/events/orders.eu".into())
        );
    }

    proptest::proptest! {
        /// Any string a peer sends is a topic that prints back to itself, or an error naming the forms.
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
            "/project/4 2/x",
            "/project/42/a/b",
            "events/x",
            "/events//x",
            "/events/x y",
            "/",
        ] {
            let e = Topic::parse(bad).unwrap_err();
            assert!(e.contains(TOPIC_FORM), "{bad}: {e}");
        }
    }
}
