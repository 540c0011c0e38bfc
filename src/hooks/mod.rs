//! GitLab webhook deliveries (`gitlab.source = "webhook"`): what the receiver (`routes::hooks`) checks before
//! accepting one. [`secret`]: `X-Gitlab-Token` against the configured secrets, in constant time; [`delivery`]: the
//! body read as a GitLab event (kind, project, confidentiality) and the key that identifies a delivery across
//! GitLab's retries.

pub mod delivery;
pub mod secret;
