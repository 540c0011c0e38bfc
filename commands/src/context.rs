//! What a handler may do: the [`Context`] the engine implements for the tab that sent a message.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::error::CommandError;
use crate::future::BoxFuture;
use crate::loop_context::{LoopContext, Notification};
use crate::loops::LoopFunction;
use crate::topic::Topic;

/// A handler's view of the tab that sent the message and of the user's session. Everything a loop function may do
/// (backend calls as the user, shared fetches, session data) a handler may do too.
pub trait Context: LoopContext {
    /// This server instance's id (shown in `init`, useful behind a load balancer).
    fn instance(&self) -> &str;

    /// Sends `{type: kind, data}` to the tab that sent the message, echoing its `id`.
    fn reply(&self, kind: &str, data: Value);
    /// Sends `{type: kind, data}` to every tab of the user.
    fn notify_user(&self, kind: &str, data: Value);

    /// Registers a loop function on the user's session. Returns false, and changes nothing, when a function of that
    /// name is already registered: registering is idempotent, so every tab may ask.
    fn register_loop(&self, function: LoopFunction) -> bool;
    /// The last notifications of the named loop function (its snapshot), if it has run.
    fn snapshot(&self, function: &str) -> Option<Vec<Notification>>;
    /// Runs the named loop function at once (if registered), without waiting for its next tick.
    fn run_loop_now(&self, function: &str);
    /// Marks this tab hidden or visible; when all the user's tabs are hidden the short loop slows down.
    fn set_hidden(&self, hidden: bool);

    /// Verifies `token` and, when valid and of the same user, makes it the session's token. Returns the reply data.
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Value, CommandError>>;

    /// Subscribes this tab to `topic`; `last_event_id` resumes after that event. Returns false when the tab already
    /// held the topic, or when the engine refused it itself with `subscriptionError` (the user may not read the
    /// project). `reply`, if any, is queued to the tab atomically with the registration and before any replayed or
    /// live event of the topic, with `added` (the return value) set in its data and the request's `id` echoed. A
    /// reply, not a callback: nothing of the command runs while the engine holds its locks. Asynchronous: the engine
    /// may first check, as the user, that they may see the topic.
    fn subscribe<'a>(
        &'a self,
        topic: &'a Topic,
        last_event_id: Option<&'a str>,
        reply: Option<Notification>,
    ) -> BoxFuture<'a, Result<bool, CommandError>>;
    /// Releases this tab's hold on `topic`. Returns false when the tab did not hold it.
    fn unsubscribe(&self, topic: &Topic) -> bool;
    /// The topics this tab holds.
    fn subscriptions(&self) -> Vec<Topic>;

    /// Replaces this tab's topics with `wanted`: releases those not wanted, then subscribes the new ones (from now
    /// on). The engine does it under its lock once, not once per topic: a hundred topics from many tabs of one user
    /// would otherwise keep the server's threads waiting on each other, and every other user with them.
    fn set_subscriptions<'a>(&'a self, wanted: &'a BTreeSet<Topic>) -> BoxFuture<'a, SetOutcome> {
        Box::pin(async move {
            let current: BTreeSet<Topic> = self.subscriptions().into_iter().collect();
            let mut out = SetOutcome::default();
            for t in current.difference(wanted) {
                if self.unsubscribe(t) {
                    out.removed.push(t.clone());
                }
            }
            for t in wanted.difference(&current) {
                match self.subscribe(t, None, None).await {
                    Ok(true) => out.added.push(t.clone()),
                    Ok(false) => {}
                    Err(e) => out.failed.push((t.clone(), e)),
                }
            }
            out
        })
    }
}

/// What [`Context::set_subscriptions`] changed.
#[derive(Debug, Default)]
pub struct SetOutcome {
    pub removed: Vec<Topic>,
    pub added: Vec<Topic>,
    /// The topics that could not be added (a limit, say), each with why.
    pub failed: Vec<(Topic, CommandError)>,
}
