//! Subscription topics. Two kinds:
//! - `/project/<id>/<eventType>`: a GitLab project's events (the Renku design), streamed from GitLab;
//! - any other path such as `/events/orders`: a *channel*, fed only by backends through the publish API. Which
//!   prefixes are accepted is the engine's configuration (`publish.namespaces`).

use std::fmt;

/// A parsed topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Topic {
    /// `project` is GitLab's id (a number, or a URL-encoded path such as `group%2Fname`), as written; it decodes
    /// ([`decode_project_id`]) to a path without `.` or `..` segments.
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

/// A `.` or `..` path segment: URL parsers and servers resolve them, so an id made of one leaves its segment.
fn dots(segment: &str) -> bool {
    segment == "." || segment == ".."
}

/// GitLab's project id as a topic names it (a number, or a URL-encoded path such as `group%2Fname`), decoded: the
/// `group/name` GitLab looks up. `None` when it is no GitLab id: a bad percent-escape, or a decoded path with an
/// empty, `.` or `..` segment or a character GitLab never puts in a path. Dot segments are refused because URL
/// parsers and servers resolve them, escaped ones (`%2e%2e`) included: `/project/../push` once made tabhub request
/// `/api/v4/events/stream`.
pub fn decode_project_id(id: &str) -> Option<String> {
    let bytes = id.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    let decoded = String::from_utf8(out).ok()?;
    let segment_ok = |seg: &str| {
        !seg.is_empty()
            && !dots(seg)
            && seg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    };
    decoded.split('/').all(segment_ok).then_some(decoded)
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
            if decode_project_id(project).is_none() {
                return Err(bad(
                    "the project id must be a number or a URL-encoded path (group%2Fname) without . or .. segments",
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
        if s.len() > MAX_PART
            || !rest.split('/').all(|seg| valid(seg, &[]) && !dots(seg))
            || s == "/project"
        {
            return Err(bad(
                "a channel is /-separated segments of [A-Za-z0-9_.-] other than . and .., at most 200 characters",
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

    #[test]
    fn project_ids_decode_to_gitlab_paths() {
        assert_eq!(decode_project_id("42").as_deref(), Some("42"));
        assert_eq!(
            decode_project_id("group%2Fsub%2fname.v2").as_deref(),
            Some("group/sub/name.v2")
        );
        assert_eq!(decode_project_id("a..b").as_deref(), Some("a..b"));
        for bad in [
            "",
            ".",
            "..",
            "%2e",
            "%2E%2e",
            "a%2F..",
            "..%2Fa",
            "a%2F.%2Fb",
            "%",
            "%2",
        ] {
            assert_eq!(decode_project_id(bad), None, "{bad}");
        }
    }

    proptest::proptest! {
        /// However a dot segment is spelt (`.`, `%2e`, `%2E`, mixed), wherever it sits in the decoded path, the
        /// topic is refused.
        #[test]
        fn dot_segments_are_refused_however_spelt(
            before in proptest::collection::vec("[a-z0-9]{1,4}", 0..3),
            dots in proptest::collection::vec(proptest::sample::select(vec![".", "%2e", "%2E"]), 1..3),
            after in proptest::collection::vec("[a-z0-9]{1,4}", 0..3),
            slash in proptest::sample::select(vec!["%2F", "%2f"]),
        ) {
            let mut segs = before.clone();
            segs.push(dots.concat());
            segs.extend(after.iter().cloned());
            let id = segs.join(slash);
            let topic = format!("/project/{id}/push");
            proptest::prop_assert!(Topic::parse(&topic).is_err(), "{} was accepted", topic);
        }

        /// Every accepted project id decodes to `/`-separated segments, none of them empty, `.` or `..`.
        #[test]
        fn accepted_ids_decode_to_clean_paths(p in "[a-z0-9.%2EeFf]{1,12}") {
            if let Ok(Topic::Project { project, .. }) = Topic::parse(&format!("/project/{p}/push")) {
                let decoded = decode_project_id(&project);
                proptest::prop_assert!(decoded.is_some());
                let decoded = decoded.unwrap_or_default();
                proptest::prop_assert!(decoded.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
            }
        }

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
            "/project/./push",
            "/project/../push",
            "/project/%2e%2e/push",
            "/project/%2E/push",
            "/project/.%2e/push",
            "/project/group%2F..%2Fadmin/push",
            "/project/group%2f%2e%2e/push",
            "/project/group%2F%2Fname/push",
            "/project/group%2F/push",
            "/project/%zz/push",
            "/project/%2/push",
            "/project/%+1/push",
            "/project/a%20b/push",
            "/project/%c3%28/push",
            "/events/../x",
            "/events/./x",
            "/events/x/..",
        ] {
            let e = Topic::parse(bad).unwrap_err();
            assert!(e.contains(TOPIC_FORM), "{bad}: {e}");
        }
    }
}
