//! A tab: one websocket connection of a user. Its outbound queue is bounded in messages and in bytes; its writer
//! task drains the queue, pings the peer and drops it when it has been silent for too long.
//!
//! Sending to a tab never waits: a full queue means the tab is not reading, and it is closed with
//! [`close_codes::SLOW_CONSUMER`] so that it cannot slow the user's other tabs or anyone else.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Sink, SinkExt};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::close_codes::{self, CloseCode};
use crate::metrics::Metrics;
use crate::profile::{Ending, Profile};

/// The sending side of a tab, shared by the session and the tab's own tasks.
pub struct Tab {
    pub id: u64,
    /// The token-custody login the tab authenticated with, if any: logout and refresh failures close the tabs of
    /// that login only. Never logged.
    pub login: Option<Arc<str>>,
    /// What the tab may receive: every frame queued to it passes its profile first.
    pub profile: Profile,
    queue: mpsc::Sender<Utf8Bytes>,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    close: Mutex<Option<(CloseCode, String)>>,
    closed: Notify,
    is_closed: AtomicBool,
    hidden: AtomicBool,
    /// Milliseconds since `epoch` of the last frame from the peer.
    last_seen_ms: AtomicU64,
    epoch: Instant,
    metrics: Arc<Metrics>,
}

/// The receiving side, owned by the writer task.
pub struct Outbox {
    queue: mpsc::Receiver<Utf8Bytes>,
    metrics: Arc<Metrics>,
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // What the tab never got leaves the depth gauge with it.
        self.queue.close();
        let mut left = 0;
        while self.queue.try_recv().is_ok() {
            left += 1;
        }
        self.metrics.outbound_queued.sub(left);
    }
}

impl Tab {
    pub fn new(
        id: u64,
        login: Option<Arc<str>>,
        profile: Profile,
        max_messages: usize,
        max_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> (Arc<Tab>, Outbox) {
        let (tx, rx) = mpsc::channel(max_messages);
        let tab = Arc::new(Tab {
            id,
            login,
            profile,
            queue: tx,
            queued_bytes: AtomicUsize::new(0),
            max_bytes,
            close: Mutex::new(None),
            closed: Notify::new(),
            is_closed: AtomicBool::new(false),
            hidden: AtomicBool::new(false),
            last_seen_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics: metrics.clone(),
        });
        (tab, Outbox { queue: rx, metrics })
    }

    /// Queues a message. Returns false (and closes the tab as a slow consumer) when the queue is full. A frame
    /// the tab's profile does not admit is left out (true: nothing went wrong).
    pub fn send(&self, msg: Utf8Bytes) -> bool {
        if self.is_closed() {
            return false;
        }
        let msg = match self.profile {
            Profile::Tabhub => msg,
            renku => match renku.admit(&msg) {
                Some(m) => m,
                None => return true,
            },
        };
        let len = msg.len();
        let total = self.queued_bytes.fetch_add(len, Ordering::AcqRel) + len;
        if total > self.max_bytes || self.queue.try_send(msg).is_err() {
            self.queued_bytes.fetch_sub(len, Ordering::AcqRel);
            self.metrics.messages_dropped.inc();
            self.close_slow("queue_full", "outbound queue full");
            return false;
        }
        self.metrics.messages_queued.inc();
        self.metrics.outbound_queued.inc();
        true
    }

    /// Asks the writer to send a close frame and stop. The first close wins.
    pub fn close(&self, code: CloseCode, reason: &str) {
        let mut c = self.close.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_none() {
            *c = Some((code, reason.to_owned()));
            self.is_closed.store(true, Ordering::Release);
            self.closed.notify_waiters();
            self.closed.notify_one();
        }
    }

    /// Closes a tab that does not read, counting why. Only the first close of a tab is counted.
    fn close_slow(&self, reason: &'static str, message: &str) {
        if !self.is_closed() {
            self.metrics.slow_consumers.inc(&[reason]);
        }
        self.close(close_codes::SLOW_CONSUMER, message);
    }

    pub fn is_closed(&self) -> bool {
        self.is_closed.load(Ordering::Acquire)
    }

    /// Resolves once `close` has been called.
    pub async fn closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// The close requested, if any.
    pub fn close_request(&self) -> Option<(CloseCode, String)> {
        self.close.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_hidden(&self, hidden: bool) -> bool {
        self.hidden.swap(hidden, Ordering::AcqRel) != hidden
    }

    pub fn is_hidden(&self) -> bool {
        self.hidden.load(Ordering::Acquire)
    }

    /// Records that the peer is alive (any frame, pongs included).
    pub fn touch(&self) {
        self.last_seen_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_seen_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Timing of the writer's keep-alive.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    /// How long one write may block before the peer is considered gone.
    pub write_timeout: Duration,
}

/// Drains the tab's queue into the socket until the tab is closed or the socket fails. Sends the requested close
/// frame when it can; a peer that does not read is simply dropped.
pub async fn write_loop<S>(tab: Arc<Tab>, mut outbox: Outbox, mut sink: S, keepalive: Keepalive)
where
    S: Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    tab.touch();
    let mut ping = tokio::time::interval_at(
        Instant::now() + keepalive.ping_interval,
        keepalive.ping_interval,
    );
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let wt = keepalive.write_timeout;
    loop {
        tokio::select! {
            biased;
            _ = tab.closed() => break,
            msg = outbox.queue.recv() => {
                let Some(msg) = msg else { break };
                match write_batch(&tab, &mut outbox, &mut sink, msg, wt).await {
                    Written::Done => {}
                    Written::Failed => {
                        tab.close(close_codes::NORMAL, "");
                        return;
                    }
                    Written::Blocked => {
                        tab.close_slow("write_timeout", "write blocked");
                        return;
                    }
                }
            }
            _ = ping.tick() => {
                if tab.silent_for() > keepalive.idle_timeout {
                    tab.metrics.idle_drops.inc();
                    tab.close(close_codes::NORMAL, "");
                    return;
                }
                match tokio::time::timeout(wt, sink.send(Message::Ping(Default::default()))).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        tab.close(close_codes::NORMAL, "");
                        return;
                    }
                    Err(_) => {
                        tab.close_slow("write_timeout", "write blocked");
                        return;
                    }
                }
            }
        }
    }
    if let Some((code, reason)) = tab.close_request() {
        // What was queued before the close (an in-band error explaining it, say) goes out first, unless the tab
        // is being closed precisely because it does not read.
        if code != close_codes::SLOW_CONSUMER {
            if let Ok(msg) = outbox.queue.try_recv() {
                let _ = write_batch(&tab, &mut outbox, &mut sink, msg, wt).await;
            }
        }
        match tab.profile.ending(code) {
            Ending::Frame(code) => {
                let frame = CloseFrame {
                    code: WsCloseCode::from(code.code),
                    reason: reason.into(),
                };
                let _ = tokio::time::timeout(wt, sink.send(Message::Close(Some(frame)))).await;
            }
            // No close frame: the connection drops when the tab's task ends, and the peer sees 1006.
            Ending::Drop => return,
        }
    }
    let _ = tokio::time::timeout(wt, sink.close()).await;
}

/// How a batch of writes ended.
enum Written {
    Done,
    /// The socket failed: the peer is gone.
    Failed,
    /// The write did not complete within the write timeout: the peer does not read (a slow consumer).
    Blocked,
}

/// Writes `first` and whatever else is queued, then flushes once.
async fn write_batch<S>(
    tab: &Tab,
    outbox: &mut Outbox,
    sink: &mut S,
    first: Utf8Bytes,
    wt: Duration,
) -> Written
where
    S: Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let work = async {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(msg) = next {
            tab.queued_bytes.fetch_sub(msg.len(), Ordering::AcqRel);
            tab.metrics.outbound_queued.dec();
            sink.feed(Message::Text(msg)).await?;
            tab.metrics.messages_delivered.inc();
            n += 1;
            next = if n < 64 {
                outbox.queue.try_recv().ok()
            } else {
                None
            };
        }
        sink.flush().await
    };
    // No select on `closed` here: a close requested meanwhile is sent after this batch. A peer that does not read
    // blocks the write until the timeout, and is then dropped.
    match tokio::time::timeout(wt, work).await {
        Ok(Ok(())) => Written::Done,
        Ok(Err(_)) => Written::Failed,
        Err(_) => Written::Blocked,
    }
}

#[cfg(test)]
impl Outbox {
    /// Everything queued so far, parsed, for unit tests with a fake tab (no socket).
    pub(crate) fn drain(&mut self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while let Ok(m) = self.queue.try_recv() {
            if let Ok(v) = serde_json::from_str(m.as_str()) {
                out.push(v);
            }
        }
        out
    }
}
