//! A webhook delivery read as a GitLab event: its kind (`object_kind`, else the `X-Gitlab-Event` header), its
//! project (`project.id`, else `project_id`), whether it is confidential, and its identity for duplicates.
//!
//! Payload shapes: GitLab's `doc/user/project/integrations/webhook_events.md`; headers: `webhooks.md`.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::history::{DeliveryKey, HookEvent};

/// The kinds GitLab documents (`object_kind`), used as metric labels; any other kind counts as `other`, so that
/// a sender cannot grow the metrics without bound.
pub const KINDS: &[&str] = &[
    "push",
    "tag_push",
    "issue",
    "work_item",
    "note",
    "merge_request",
    "wiki_page",
    "pipeline",
    "build",
    "deployment",
    "feature_flag",
    "release",
    "milestone",
    "emoji",
    "access_token",
    "vulnerability",
    "member",
    "project",
    "subgroup",
];

/// The metric label of a kind.
pub fn kind_label(kind: Option<&str>) -> &'static str {
    match kind {
        Some(k) => KINDS.iter().find(|x| **x == k).copied().unwrap_or("other"),
        None => "unknown",
    }
}

/// `X-Gitlab-Event` -> `object_kind`, for a body without one.
fn kind_of_header(header: &str) -> Option<&'static str> {
    Some(match header {
        "Push Hook" => "push",
        "Tag Push Hook" => "tag_push",
        "Issue Hook" | "Confidential Issue Hook" => "issue",
        "Note Hook" | "Confidential Note Hook" => "note",
        "Merge Request Hook" => "merge_request",
        "Wiki Page Hook" => "wiki_page",
        "Pipeline Hook" => "pipeline",
        "Job Hook" => "build",
        "Deployment Hook" => "deployment",
        "Feature Flag Hook" => "feature_flag",
        "Release Hook" => "release",
        "Milestone Hook" => "milestone",
        "Emoji Hook" => "emoji",
        _ => return None,
    })
}

/// A well-formed delivery.
#[derive(Debug)]
pub struct Parsed {
    pub kind: String,
    /// None when the event names no project (a system hook's user or group event): nothing to deliver, and still
    /// a 2xx, since GitLab disables hooks that keep getting 4xx.
    pub event: Option<HookEvent>,
}

/// Whether `s` can be a topic's part (`[A-Za-z0-9_.-]`, 1-100 characters).
fn topic_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// A project id as GitLab sends it: a positive integer (in JSON, or as a string of digits).
fn project_id(v: &Value) -> Option<Result<String, ()>> {
    match v {
        Value::Null => None,
        Value::Number(n) => Some(n.as_u64().map(|n| n.to_string()).ok_or(())),
        Value::String(s)
            if !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Some(Ok(s.clone()))
        }
        _ => Some(Err(())),
    }
}

/// Reads a delivery's body; the error names the problem (answered with 400).
pub fn parse(body: &[u8], event_header: Option<&str>) -> Result<Parsed, String> {
    let payload: Value =
        serde_json::from_slice(body).map_err(|e| format!("malformed JSON: {e}"))?;
    if !payload.is_object() {
        return Err("the body must be a JSON object".into());
    }
    let kind = match &payload["object_kind"] {
        Value::String(k) => k.clone(),
        Value::Null => event_header
            .and_then(kind_of_header)
            .map(str::to_owned)
            .ok_or("no object_kind in the body, and no known X-Gitlab-Event header")?,
        _ => return Err("object_kind must be a string".into()),
    };
    if !topic_part(&kind) {
        return Err("object_kind must be 1-100 characters of [A-Za-z0-9_.-]".into());
    }
    let project = match project_id(&payload["project"]["id"]) {
        Some(p) => Some(p.map_err(|_| "project.id must be a positive integer".to_owned())?),
        None => project_id(&payload["project_id"])
            .transpose()
            .map_err(|_| "project_id must be a positive integer".to_owned())?,
    };
    let Some(project) = project else {
        return Ok(Parsed { kind, event: None });
    };
    let confidential = matches!(
        event_header,
        Some("Confidential Issue Hook" | "Confidential Note Hook")
    ) || matches!(
        payload["event_type"].as_str(),
        Some("confidential_issue" | "confidential_note")
    ) || payload["object_attributes"]["confidential"] == Value::Bool(true)
        // A note on a confidential issue.
        || payload["issue"]["confidential"] == Value::Bool(true);
    Ok(Parsed {
        event: Some(HookEvent {
            project,
            event_type: kind.clone(),
            confidential,
            payload,
        }),
        kind,
    })
}

/// What identifies a delivery across GitLab's retries: its `Idempotency-Key` (GitLab 17.4 and later: the same on
/// every retry), else the body itself. Hashed, so that a key of any length costs the same to keep.
pub fn key(idempotency_key: Option<&[u8]>, body: &[u8]) -> DeliveryKey {
    let mut h = Sha256::new();
    match idempotency_key {
        Some(k) => {
            h.update(b"idempotency-key\0");
            h.update(k);
        }
        None => {
            h.update(b"body\0");
            h.update(body);
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_json(v: Value, header: Option<&str>) -> Result<Parsed, String> {
        parse(v.to_string().as_bytes(), header)
    }

    #[test]
    fn kinds_projects_and_confidentiality() {
        let p = parse_json(
            json!({"object_kind": "push", "project_id": 15, "project": {"id": 15}}),
            Some("Push Hook"),
        )
        .unwrap();
        let e = p.event.unwrap();
        assert_eq!(
            (p.kind.as_str(), e.project.as_str(), e.confidential),
            ("push", "15", false)
        );
        // Jobs carry project_id only.
        let p = parse_json(
            json!({"object_kind": "build", "project_id": 380}),
            Some("Job Hook"),
        )
        .unwrap();
        assert_eq!(p.event.unwrap().project, "380");
        let p = parse_json(
            json!({"object_kind": "issue", "event_type": "confidential_issue", "project": {"id": 1},
                   "object_attributes": {"confidential": true}}),
            Some("Confidential Issue Hook"),
        )
        .unwrap();
        assert!(p.event.unwrap().confidential);
        let p = parse_json(
            json!({"object_kind": "note", "project_id": 5, "issue": {"confidential": true}}),
            None,
        )
        .unwrap();
        assert!(p.event.unwrap().confidential);
        // The header names the kind when the body does not.
        let p = parse_json(json!({"project": {"id": 2}}), Some("Merge Request Hook")).unwrap();
        assert_eq!(p.kind, "merge_request");
        // No project: well-formed, nothing to deliver.
        let p = parse_json(
            json!({"event_name": "user_create", "object_kind": "user"}),
            Some("System Hook"),
        )
        .unwrap();
        assert!(p.event.is_none());
    }

    #[test]
    fn malformed_bodies_are_named() {
        for (body, says) in [
            (&b"{"[..], "malformed JSON"),
            (b"[1]", "JSON object"),
            (b"{\"project_id\": 1}", "object_kind"),
            (
                b"{\"object_kind\": 3, \"project_id\": 1}",
                "object_kind must be a string",
            ),
            (
                b"{\"object_kind\": \"a/b\", \"project_id\": 1}",
                "object_kind must be",
            ),
            (
                b"{\"object_kind\": \"push\", \"project\": {\"id\": -4}}",
                "project.id",
            ),
            (
                b"{\"object_kind\": \"push\", \"project_id\": \"../x\"}",
                "project_id",
            ),
        ] {
            let e = parse(body, None).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn keys_follow_the_idempotency_key_else_the_body() {
        assert_eq!(key(Some(b"k1"), b"a"), key(Some(b"k1"), b"b"));
        assert_ne!(key(Some(b"k1"), b"a"), key(Some(b"k2"), b"a"));
        assert_eq!(key(None, b"a"), key(None, b"a"));
        assert_ne!(key(None, b"a"), key(None, b"b"));
        assert_ne!(key(None, b"k1"), key(Some(b"k1"), b"x"));
        assert_eq!(kind_label(Some("push")), "push");
        assert_eq!(kind_label(Some("zzz")), "other");
    }
}
