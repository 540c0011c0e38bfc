//! Delivery on this instance: what every instance does with a batch that comes back from the broker.
//!
//! Registered on the broker by the app as its [`BatchHandler`], so the broker knows nothing of hubs or sessions.

use std::sync::Arc;

use tabhub_commands::Topic;

use crate::config::BrokerKind;
use crate::history::Stored;
use crate::hub::Hub;
use crate::protocol;
use crate::publish::broker::BatchHandler;
use crate::publish::message::{Message, Target};
use crate::services::Services;

/// Delivers published batches to this instance's tabs.
pub struct Delivery {
    pub hub: Arc<Hub>,
    pub services: Arc<Services>,
}

impl BatchHandler for Delivery {
    /// A webhook event: encoded once, to the sessions of the users following its project on this instance, each
    /// checking its tabs' topics and the user's access.
    fn deliver_hook(&self, s: &Stored) {
        let e = &s.event;
        let topic = Topic::project(&e.project, &e.event_type);
        let msg = s.encode();
        let mut tabs = 0;
        for user in self.services.watchers.users(&e.project) {
            if let Some(session) = self.hub.get(&user) {
                tabs += session.deliver_hook(&topic, s.id, e.confidential, &msg);
            }
        }
        self.services.metrics.hook_fanout.observe(tabs as u64);
    }

    fn deliver(&self, messages: &[Message]) {
        let (services, hub) = (&self.services, &self.hub);
        for m in messages {
            match &m.target {
                Target::User(user) => {
                    let msg = protocol::encode_published("user", &m.kind, &m.data, &m.id, None);
                    if let Some(s) = hub.get(user) {
                        s.send_all(&msg);
                    }
                    services.metrics.published.inc(&["user"]);
                }
                Target::Broadcast(_) => {
                    let msg =
                        protocol::encode_published("broadcast", &m.kind, &m.data, &m.id, None);
                    for s in hub.all() {
                        s.send_all(&msg);
                    }
                    services.metrics.published.inc(&["broadcast"]);
                }
                Target::Topic(name) => {
                    let msg =
                        protocol::encode_published("topic", &m.kind, &m.data, &m.id, Some(name));
                    let topic = Topic::Channel(name.clone());
                    if services.config.broker.kind == BrokerKind::Redis {
                        // The channel's history is in Redis: tabs resuming hold live messages back by id.
                        let id = m.id.parse::<u64>().ok();
                        for user in services.channels.holders(name) {
                            if let Some(s) = hub.get(&user) {
                                s.deliver_to_holders(&topic, id, &msg);
                            }
                        }
                        services.metrics.published.inc(&["topic"]);
                        continue;
                    }
                    // Without a buffer (every buffered channel is held by others) nobody holds this channel.
                    if let Some(buffer) = services.channels.buffer(name) {
                        let mut b = buffer.lock().unwrap_or_else(|p| p.into_inner());
                        if b.messages.len() >= services.config.publish.buffer_events {
                            b.messages.pop_front();
                        }
                        b.messages.push_back((m.id.clone(), msg.clone()));
                        for user in services.channels.holders(name) {
                            if let Some(s) = hub.get(&user) {
                                s.deliver_to_holders(&topic, None, &msg);
                            }
                        }
                    }
                    services.metrics.published.inc(&["topic"]);
                }
            }
        }
    }
}
