//! Backends push to browsers: `POST /api/publish` ([`api`]) with a target (a user, a topic, everyone), a `type`
//! and `data`. Messages travel through a [`broker`] so that they reach every instance (Redis pub/sub), or only this
//! one (memory), and each instance delivers to its own tabs ([`deliver`]). Topic messages go to publish-only
//! channels ([`channels`]) with a bounded replay buffer for `lastEventId` (memory), or a history in Redis streams shared
//! by every instance (redis, [`crate::history`]).
//!
//! Tabs receive `{timestamp, scope, type, data, eventId}` with `scope` `user`, `topic` (plus `topic`) or
//! `broadcast`; `type` and `data` pass through unchanged (orchestrator-core's `invalidateCache` events too).

pub mod broker;
pub mod deliver;
pub mod message;
