//! Who may receive a project's events (webhook source). GitLab posts a webhook once for everybody and checks nobody,
//! so tabhub asks, **as the user**, `GET {access.backend}{access.path}` (GitLab's `GET /api/v4/projects/:id`, or
//! the same through Renku's gateway, which exchanges the user's token): 2xx allows, with the user's access level
//! read from the answer (`permissions.project_access` / `group_access`), 403 and 404 refuse, and a backend that
//! cannot answer refuses too, never allows. Answers are cached per user and project: allowed for
//! `access.allowed_ttl_ms`, refused for the shorter `access.refused_ttl_ms`; no answer is not cached.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tabhub_commands::BackendError;

use crate::backends::{Backends, TokenSource};
use crate::config::AccessConfig;
use crate::metrics::Metrics;

/// What the check says about one user and one project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The user may read the project, with this GitLab access level (0 when the answer names none: a public
    /// project the user is no member of).
    Allowed { level: u64 },
    /// The backend refused: 401 (the token), 403 or 404.
    Refused { status: u16 },
    /// No usable answer (timeout, 5xx, backoff): refused, and not cached.
    Unavailable,
}

impl Verdict {
    /// The `subscriptionError` a refusal gives: status and message. None when allowed.
    pub fn refusal(&self) -> Option<(u16, &'static str)> {
        match self {
            Verdict::Allowed { .. } => None,
            Verdict::Refused { status: 401 } => {
                Some((401, "GitLab refused the user's token for this project"))
            }
            Verdict::Refused { status: 404 } => Some((404, "project not found or not visible")),
            Verdict::Refused { status } => Some((*status, "access to the project refused")),
            Verdict::Unavailable => Some((
                503,
                "cannot check access to the project now; try again later",
            )),
        }
    }
}

/// The highest access level the project answer grants (`permissions.project_access.access_level`,
/// `permissions.group_access.access_level`).
fn access_level(body: &Value) -> u64 {
    ["project_access", "group_access"]
        .iter()
        .filter_map(|k| body["permissions"][k]["access_level"].as_u64())
        .max()
        .unwrap_or(0)
}

struct Ttl {
    allowed: Duration,
    refused: Duration,
}

impl moka::Expiry<(String, String), Verdict> for Ttl {
    fn expire_after_create(
        &self,
        _key: &(String, String),
        value: &Verdict,
        _now: Instant,
    ) -> Option<Duration> {
        Some(match value {
            Verdict::Allowed { .. } => self.allowed,
            _ => self.refused,
        })
    }
}

pub struct Access {
    config: AccessConfig,
    cache: moka::future::Cache<(String, String), Verdict>,
    metrics: Arc<Metrics>,
}

impl Access {
    pub fn new(config: &AccessConfig, metrics: Arc<Metrics>) -> Access {
        Access {
            cache: moka::future::Cache::builder()
                .max_capacity(config.max_entries)
                .expire_after(Ttl {
                    allowed: Duration::from_millis(config.allowed_ttl_ms),
                    refused: Duration::from_millis(config.refused_ttl_ms),
                })
                .build(),
            config: config.clone(),
            metrics,
        }
    }

    /// Whether confidential events may reach a user of this verdict.
    pub fn sees_confidential(&self, level: u64) -> bool {
        level >= self.config.confidential_min_level
    }

    /// May the user (`tokens`) read `project`? Cached; concurrent misses of one user and project share one call.
    pub async fn check(
        &self,
        backends: &Backends,
        tokens: &dyn TokenSource,
        project: &str,
    ) -> Verdict {
        let key = (tokens.caller().to_owned(), project.to_owned());
        let mut asked = false;
        let cached = self
            .cache
            .optionally_get_with(key, async {
                asked = true;
                let v = self.ask(backends, tokens, project).await;
                self.metrics.access_checks.inc(&[outcome(&v), "backend"]);
                // No answer is not cached: the next subscribe asks again.
                (v != Verdict::Unavailable).then_some(v)
            })
            .await;
        let v = cached.unwrap_or(Verdict::Unavailable);
        if !asked {
            self.metrics.access_checks.inc(&[outcome(&v), "cached"]);
        }
        v
    }

    async fn ask(&self, backends: &Backends, tokens: &dyn TokenSource, project: &str) -> Verdict {
        let path = self.config.path.replace("{project}", project);
        match backends
            .get_as_user(&self.config.backend, &path, tokens)
            .await
        {
            Ok(r) if (200..300).contains(&r.status) => Verdict::Allowed {
                level: access_level(&r.body),
            },
            Ok(r) if matches!(r.status, 401 | 403 | 404) => Verdict::Refused { status: r.status },
            Err(BackendError::Unauthorized) => Verdict::Refused { status: 401 },
            Ok(r) if (400..500).contains(&r.status) && r.status != 429 => {
                Verdict::Refused { status: 403 }
            }
            Ok(_) | Err(_) => Verdict::Unavailable,
        }
    }
}

fn outcome(v: &Verdict) -> &'static str {
    match v {
        Verdict::Allowed { .. } => "allowed",
        Verdict::Refused { .. } => "refused",
        Verdict::Unavailable => "unavailable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_level_is_the_highest_granted() {
        assert_eq!(access_level(&json!({})), 0);
        let both = json!({"permissions": {"project_access": {"access_level": 10},
                                           "group_access": {"access_level": 30}}});
        assert_eq!(access_level(&both), 30);
        let project_only =
            json!({"permissions": {"project_access": {"access_level": 40}, "group_access": null}});
        assert_eq!(access_level(&project_only), 40);
    }
}
