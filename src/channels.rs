//! Channels (publish-only topics): which users hold each, and a bounded replay buffer per channel. The buffers
//! serve the memory broker only: with Redis a channel's history is a Redis stream shared by every instance
//! ([`crate::history::History::channel_after`]), so that ids and resumes do not depend on the instance.
//!
//! Lock order: a channel's buffer, then a session, then the index (a leaf). Delivery holds the buffer while it
//! appends and hands the message to the sessions; a subscription with a `lastEventId` holds it while it registers
//! and replays. So a message is either replayed or delivered live to a resubscribing tab, never both, never neither.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A channel's recent messages: (message id, encoded message).
#[derive(Default)]
pub struct Buffer {
    pub messages: VecDeque<(String, Utf8Bytes)>,
}

impl Buffer {
    /// The messages after `id`; None when `id` is not in the buffer (too old, or unknown).
    pub fn after(&self, id: &str) -> Option<Vec<Utf8Bytes>> {
        let at = self.messages.iter().position(|(i, _)| i == id)?;
        Some(
            self.messages
                .iter()
                .skip(at + 1)
                .map(|(_, m)| m.clone())
                .collect(),
        )
    }
}

/// The channels of this instance. At most `max_buffered` channels have a buffer; a channel without a buffer cannot
/// be subscribed to (its replay would silently be missing), so a full table refuses new subscriptions instead.
pub struct Channels {
    /// channel -> users with at least one tab holding it.
    index: Mutex<HashMap<String, HashSet<String>>>,
    buffers: Mutex<HashMap<String, Arc<Mutex<Buffer>>>>,
    max_buffered: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Channels {
    pub fn new(max_buffered: usize) -> Channels {
        Channels {
            index: Mutex::default(),
            buffers: Mutex::default(),
            max_buffered,
        }
    }

    pub fn add_holder(&self, channel: &str, user: &str) {
        lock(&self.index)
            .entry(channel.to_owned())
            .or_default()
            .insert(user.to_owned());
    }

    pub fn remove_holder(&self, channel: &str, user: &str) {
        let mut index = lock(&self.index);
        if let Some(users) = index.get_mut(channel) {
            users.remove(user);
            if users.is_empty() {
                index.remove(channel);
            }
        }
    }

    /// The users holding `channel`.
    pub fn holders(&self, channel: &str) -> Vec<String> {
        lock(&self.index)
            .get(channel)
            .map(|u| u.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The channel's buffer, created if needed. Beyond `max_topics` buffers, those of channels nobody holds are
    /// dropped first.
    /// The channel's buffer, created if there is room. Channels nobody holds make room for new ones; when every
    /// buffered channel is held, `None`: the caller refuses the subscription, and a message published to such a
    /// channel reaches nobody anyway (a channel without a buffer has no holder).
    pub fn buffer(&self, channel: &str) -> Option<Arc<Mutex<Buffer>>> {
        let mut buffers = lock(&self.buffers);
        if let Some(b) = buffers.get(channel) {
            return Some(b.clone());
        }
        if buffers.len() >= self.max_buffered {
            let index = lock(&self.index);
            buffers.retain(|name, _| index.contains_key(name));
        }
        if buffers.len() >= self.max_buffered {
            return None;
        }
        let b = Arc::new(Mutex::new(Buffer::default()));
        buffers.insert(channel.to_owned(), b.clone());
        Some(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_after_an_id() {
        let mut b = Buffer::default();
        for i in 1..=3 {
            b.messages
                .push_back((i.to_string(), Utf8Bytes::from(format!("m{i}"))));
        }
        assert_eq!(
            b.after("1").unwrap(),
            vec![Utf8Bytes::from("m2"), Utf8Bytes::from("m3")]
        );
        assert!(b.after("3").unwrap().is_empty());
        assert!(b.after("9").is_none());
    }

    #[test]
    fn holders_and_bounded_buffers() {
        let c = Channels::new(2);
        c.add_holder("/events/a", "u1");
        c.add_holder("/events/a", "u2");
        c.remove_holder("/events/a", "u1");
        assert_eq!(c.holders("/events/a"), vec!["u2".to_string()]);
        assert!(c.buffer("/events/a").is_some());
        assert!(c.buffer("/events/x").is_some());
        assert!(c.buffer("/events/y").is_some());
        assert_eq!(
            lock(&c.buffers).len(),
            2,
            "unheld /events/x was dropped for /events/y"
        );
        assert!(lock(&c.buffers).contains_key("/events/a"));
        // Every buffered channel held: no unregistered buffer is handed out.
        c.add_holder("/events/y", "u3");
        assert!(c.buffer("/events/z").is_none());
        assert!(
            c.buffer("/events/y").is_some(),
            "a buffered channel stays available"
        );
    }
}
