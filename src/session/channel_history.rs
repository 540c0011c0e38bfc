//! A session's side of publish channels whose history is in Redis (`broker.kind = "redis"`): a tab resuming with a
//! `lastEventId` gets what it missed from the channel's stream, whichever instance it was on before.
//!
//! As with the webhook source ([`super::hooks`]), the tab is registered first as *catching up*: live messages for
//! it queue (by id) while the history is read, then the reply, the replay and the queued messages newer than the
//! replay go out in that order, so nothing is lost or repeated. The channel buffers of the memory broker are not
//! used: the history is shared, the ids are the history's.

use serde::Deserialize;
use serde_json::Value;
use tabhub_commands::Topic;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{begin_resume, Session, SubscribeReply};
use crate::history::Replay;
use crate::protocol;
use crate::subscriptions::SubscribeError;
use crate::tab::Tab;

/// What a replay needs of a message kept in a channel's history (the publish API's `Message`, read here by shape so
/// that sessions do not depend on the publish side, which delivers to them).
#[derive(Deserialize)]
struct Kept {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: Value,
}

impl Session {
    /// Subscribes `tab` to a publish channel kept in Redis, replaying after `last_event_id` (see the module
    /// documentation). An id that is no number cannot be placed in the history: from now on, with `gap`; so does a
    /// history that cannot be read now (Redis down).
    pub async fn subscribe_channel_shared(
        &self,
        tab: &Tab,
        topic: &Topic,
        last_event_id: Option<&str>,
        mut reply: Option<SubscribeReply<'_>>,
    ) -> Result<bool, SubscribeError> {
        let Topic::Channel(name) = topic else {
            return Ok(false);
        };
        let resume = last_event_id
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u64>().ok());
        let limits = self.sub_limits();
        {
            let mut inner = self.lock();
            if inner.stopped {
                return Ok(false);
            }
            let (added, _, _) = inner.subs.subscribe(tab.id, topic, last_event_id, limits)?;
            self.services.channels.add_holder(name, &self.user.id);
            if !begin_resume(&mut inner, tab, topic, added, resume, &mut reply) {
                return Ok(added);
            }
        }
        let Some(Some(after)) = resume else {
            return Ok(true);
        };
        let replay = match self.services.history.channel_after(name, after).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(user = %self.user.id, channel = %name, error = %e, "channel history unavailable for a resume");
                Replay {
                    events: Vec::new(),
                    gap: true,
                }
            }
        };
        let mut inner = self.lock();
        let Some(queued) = inner.catching.remove(&(tab.id, topic.clone())) else {
            // The tab left, or unsubscribed, meanwhile.
            return Ok(true);
        };
        let newest = replay.events.last().map_or(after, |e| e.0.max(after));
        let missed: Vec<Utf8Bytes> = replay
            .events
            .iter()
            .filter_map(|(id, json)| match serde_json::from_str::<Kept>(json) {
                Ok(m) => Some(protocol::encode_published(
                    "topic",
                    &m.kind,
                    &m.data,
                    &id.to_string(),
                    Some(name),
                )),
                Err(e) => {
                    tracing::warn!(error = %e, channel = %name, "unreadable message in the channel history");
                    None
                }
            })
            .collect();
        self.finish_resume(tab, reply, missed, queued, newest, replay.gap);
        drop(inner);
        Ok(true)
    }
}
