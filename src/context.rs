//! The engine's side of the command interface: [`TabContext`] for handlers, [`LoopCtx`] for loop functions.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use tabhub_commands::{
    BackendError, BackendResponse, BoxFuture, CommandError, Context, LoopContext, LoopFunction,
    Notification, SessionData, Topic, User,
};

use crate::app::App;
use crate::protocol;
use crate::session::Session;
use crate::tab::Tab;

/// A loop function's context: the session, for one iteration. A handler's [`TabContext`] holds one too, so the two
/// contexts share this single implementation of [`LoopContext`].
pub struct LoopCtx {
    session: Arc<Session>,
}

impl LoopCtx {
    pub fn new(session: Arc<Session>) -> Self {
        LoopCtx { session }
    }
}

impl LoopContext for LoopCtx {
    fn user(&self) -> &User {
        &self.session.user
    }
    fn settings(&self) -> &Map<String, Value> {
        &self.session.app().settings
    }
    fn session_data(&self) -> &SessionData {
        self.session.data()
    }
    fn backend_get<'a>(
        &'a self,
        backend: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, Result<BackendResponse, BackendError>> {
        Box::pin(
            self.session
                .app()
                .backends
                .get_as_user(backend, path, &self.session),
        )
    }
    fn shared_get<'a>(
        &'a self,
        url: &'a str,
    ) -> BoxFuture<'a, Result<BackendResponse, BackendError>> {
        Box::pin(self.session.app().backends.shared_get(url))
    }
}

/// A handler's context: the tab that sent the message, the message's `id`, and its session as a [`LoopCtx`].
pub struct TabContext<'a> {
    loop_ctx: LoopCtx,
    tab: &'a Arc<Tab>,
    id: Option<&'a Value>,
}

impl<'a> TabContext<'a> {
    pub fn new(session: &Arc<Session>, tab: &'a Arc<Tab>, id: Option<&'a Value>) -> Self {
        TabContext {
            loop_ctx: LoopCtx::new(session.clone()),
            tab,
            id,
        }
    }

    fn session(&self) -> &Arc<Session> {
        &self.loop_ctx.session
    }

    fn app(&self) -> &Arc<App> {
        self.session().app()
    }
}

/// Everything a loop function may do, a handler does through its [`LoopCtx`]. `Context: LoopContext` needs this impl
/// on the type itself: a blanket impl over `Deref` could only live in the commands crate.
impl LoopContext for TabContext<'_> {
    fn user(&self) -> &User {
        self.loop_ctx.user()
    }
    fn settings(&self) -> &Map<String, Value> {
        self.loop_ctx.settings()
    }
    fn session_data(&self) -> &SessionData {
        self.loop_ctx.session_data()
    }
    fn backend_get<'a>(
        &'a self,
        backend: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, Result<BackendResponse, BackendError>> {
        self.loop_ctx.backend_get(backend, path)
    }
    fn shared_get<'a>(
        &'a self,
        url: &'a str,
    ) -> BoxFuture<'a, Result<BackendResponse, BackendError>> {
        self.loop_ctx.shared_get(url)
    }
}

impl Context for TabContext<'_> {
    fn instance(&self) -> &str {
        &self.app().instance
    }

    fn reply(&self, kind: &str, data: Value) {
        self.tab.send(protocol::encode(kind, &data, self.id));
    }

    fn notify_user(&self, kind: &str, data: Value) {
        self.session().broadcast(kind, &data);
    }

    fn register_loop(&self, function: LoopFunction) -> bool {
        self.session().register_loop(function)
    }

    fn snapshot(&self, function: &str) -> Option<Vec<Notification>> {
        self.session().snapshot(function)
    }

    fn run_loop_now(&self, function: &str) {
        self.session().run_loop_now(function);
    }

    fn set_hidden(&self, hidden: bool) {
        self.session().set_hidden(self.tab, hidden);
    }

    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Value, CommandError>> {
        Box::pin(async move {
            let verified = self
                .app()
                .realm
                .verify(token)
                .await
                .map_err(|e| CommandError::failed(e.to_string()))?;
            if verified.user.id != self.session().user.id {
                return Err(CommandError::failed(
                    "the token belongs to another user; open a new connection to switch users",
                ));
            }
            self.session().offer_token(&verified);
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            Ok(json!({
                "message": "Token accepted.",
                "expiresIn": verified.exp.saturating_sub(now),
            }))
        })
    }

    fn subscribe(
        &self,
        topic: &Topic,
        last_event_id: Option<&str>,
        ack: &(dyn Fn(bool) -> Option<Notification> + Sync),
    ) -> Result<bool, CommandError> {
        let ack =
            |added| ack(added).map(|n: Notification| protocol::encode(&n.kind, &n.data, self.id));
        if let Topic::Channel(name) = topic {
            let publish = &self.app().config.publish;
            if !publish
                .namespaces
                .iter()
                .any(|n| name.starts_with(n.as_str()))
            {
                return Err(CommandError::failed(format!(
                    "{topic}: not a project topic nor in a publish namespace ({})",
                    publish.namespaces.join(", ")
                )));
            }
            let buffer = self
                .app()
                .channels
                .buffer(name, publish.max_buffered_topics);
            let guard = buffer.lock().unwrap_or_else(|p| p.into_inner());
            return self
                .session()
                .subscribe_channel(self.tab, topic, last_event_id, ack, &guard)
                .map_err(|e| CommandError::failed(format!("{topic}: {e}")));
        }
        if self.app().config.gitlab.url.is_empty() {
            return Err(CommandError::failed(format!(
                "{topic}: subscriptions are not configured on this server (gitlab.url)"
            )));
        }
        self.session()
            .subscribe(self.tab, topic, last_event_id, ack)
            .map_err(|e| CommandError::failed(format!("{topic}: {e}")))
    }

    fn unsubscribe(&self, topic: &Topic) -> bool {
        self.session().unsubscribe(self.tab, topic)
    }

    fn subscriptions(&self) -> Vec<Topic> {
        self.session().topics_of(self.tab)
    }
}
