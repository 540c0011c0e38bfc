//! The engine's side of the command interface: [`TabContext`], what a handler sees of the tab that sent the
//! message and of the user's session. Loop functions see the session itself (it implements
//! [`LoopContext`](tabhub_commands::LoopContext)).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use serde_json::{json, Value};
use tabhub_commands::{
    BackendError, BackendResponse, BoxFuture, CommandError, Context, LoopContext, LoopFunction,
    Notification, SessionData, SetOutcome, Topic, User,
};

use crate::access::Verdict;
use crate::clock::now_unix;
use crate::config::{BrokerKind, GitlabSource};
use crate::protocol;
use crate::services::Services;
use crate::session::hooks::HookRefusal;
use crate::session::{Session, SubscribeReply};
use crate::subscriptions::SubscribeError;
use crate::tab::Tab;

pub struct TabContext<'a> {
    session: &'a Arc<Session>,
    tab: &'a Arc<Tab>,
    id: Option<&'a Value>,
}

impl<'a> TabContext<'a> {
    pub fn new(session: &'a Arc<Session>, tab: &'a Arc<Tab>, id: Option<&'a Value>) -> Self {
        TabContext { session, tab, id }
    }

    fn services(&self) -> &Services {
        self.session.services()
    }
}

impl LoopContext for TabContext<'_> {
    fn user(&self) -> &User {
        self.session.user()
    }
    fn session_data(&self) -> &SessionData {
        self.session.session_data()
    }
    fn backend_get<'a>(
        &'a self,
        backend: &'a str,
        path: &'a str,
    ) -> BoxFuture<'a, Result<BackendResponse, BackendError>> {
        self.session.backend_get(backend, path)
    }
    fn shared_get<'a>(
        &'a self,
        url: &'a str,
    ) -> BoxFuture<'a, Result<BackendResponse, BackendError>> {
        self.session.shared_get(url)
    }
}

impl Context for TabContext<'_> {
    fn instance(&self) -> &str {
        &self.services().instance
    }

    fn reply(&self, kind: &str, data: Value) {
        self.tab.send(protocol::encode(kind, &data, self.id));
    }

    fn notify_user(&self, kind: &str, data: Value) {
        self.session.broadcast(kind, &data);
    }

    fn register_loop(&self, function: LoopFunction) -> bool {
        self.session.register_loop(function)
    }

    fn snapshot(&self, function: &str) -> Option<Vec<Notification>> {
        self.session.snapshot(function)
    }

    fn run_loop_now(&self, function: &str) {
        self.session.run_loop_now(function);
    }

    fn set_hidden(&self, hidden: bool) {
        self.session.set_hidden(self.tab, hidden);
    }

    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Value, CommandError>> {
        Box::pin(async move {
            let verified = self
                .services()
                .verify_token(token)
                .await
                .map_err(|e| CommandError::failed(e.to_string()))?;
            if verified.user.id != self.session.user.id {
                return Err(CommandError::failed(
                    "the token belongs to another user; open a new connection to switch users",
                ));
            }
            self.session.offer_token(&verified);
            Ok(json!({
                "message": "Token accepted.",
                "expiresIn": verified.exp.saturating_sub(now_unix()),
            }))
        })
    }

    fn subscribe<'a>(
        &'a self,
        topic: &'a Topic,
        last_event_id: Option<&'a str>,
        reply: Option<Notification>,
    ) -> BoxFuture<'a, Result<bool, CommandError>> {
        Box::pin(async move {
            let reply = reply.map(|note| SubscribeReply { note, id: self.id });
            let services = self.services();
            let refused = |why: String| CommandError::failed(format!("{topic}: {why}"));
            if let Topic::Channel(name) = topic {
                let publish = &services.config.publish;
                if !publish.allows_channel(name) {
                    return Err(refused(format!(
                        "not a project topic nor in a publish namespace ({})",
                        publish.namespaces.join(", ")
                    )));
                }
                if services.config.broker.kind == BrokerKind::Redis {
                    return self
                        .session
                        .subscribe_channel_shared(self.tab, topic, last_event_id, reply)
                        .await
                        .map_err(|e| refused(e.to_string()));
                }
                let Some(buffer) = services.channels.buffer(name) else {
                    return Err(refused(
                        "too many publish channels on this server (publish.max_buffered_topics)"
                            .into(),
                    ));
                };
                return self
                    .session
                    .subscribe_channel(self.tab, topic, last_event_id, reply, &buffer)
                    .map_err(|e| refused(e.to_string()));
            }
            if services.config.gitlab.url.is_empty() {
                return Err(refused(NO_GITLAB.into()));
            }
            if services.config.gitlab.source == GitlabSource::Sse {
                return self
                    .session
                    .subscribe(self.tab, topic, last_event_id, reply)
                    .map_err(|e| refused(e.to_string()));
            }
            match self
                .session
                .subscribe_hooked(self.tab, topic, last_event_id, reply)
                .await
            {
                Ok(added) => Ok(added),
                Err(HookRefusal::Limit(e)) => Err(refused(e.to_string())),
                Err(HookRefusal::Access(status, message)) => {
                    // As the SSE source says it when GitLab refuses a stream; the request's id echoed.
                    let data =
                        json!({"topic": topic.to_string(), "status": status, "message": message});
                    self.tab.send(protocol::encode_scoped(
                        "topic",
                        "subscriptionError",
                        &data,
                        self.id,
                    ));
                    Ok(false)
                }
            }
        })
    }

    fn unsubscribe(&self, topic: &Topic) -> bool {
        self.session.unsubscribe(self.tab, topic)
    }

    fn subscriptions(&self) -> Vec<Topic> {
        self.session.topics_of(self.tab)
    }

    fn set_subscriptions<'a>(&'a self, wanted: &'a BTreeSet<Topic>) -> BoxFuture<'a, SetOutcome> {
        Box::pin(async move {
            let config = &self.services().config;
            let projects = !config.gitlab.url.is_empty();
            let refused = |t: &Topic, why: &dyn std::fmt::Display| {
                CommandError::failed(format!("{t}: {why}"))
            };
            let mut failed: Vec<(Topic, CommandError)> = Vec::new();
            // Webhook source: the new projects' access is checked first, as the user, outside the session's lock.
            let hooked = if projects && config.gitlab.source == GitlabSource::Webhook {
                let current: BTreeSet<Topic> = self.subscriptions().into_iter().collect();
                let new_projects: BTreeSet<&str> = wanted
                    .difference(&current)
                    .filter_map(Topic::project_id)
                    .collect();
                let mut levels = HashMap::new();
                // At most the per-user project limit is checked per command: beyond it, set_topics refuses by the
                // limit anyway, and one command must not cost the backend a call per project named in it.
                let cap = config.gitlab.max_projects_per_user;
                for (i, p) in new_projects.into_iter().enumerate() {
                    if i >= cap {
                        let why = SubscribeError::TooManyProjects(cap);
                        for t in wanted
                            .difference(&current)
                            .filter(|t| t.project_id() == Some(p))
                        {
                            failed.push((t.clone(), refused(t, &why)));
                        }
                        continue;
                    }
                    match self.session.check_access(p).await {
                        Verdict::Allowed { level } => {
                            levels.insert(p.to_owned(), level);
                        }
                        v => {
                            let (status, message) = v.refusal().unwrap_or((403, "refused"));
                            for t in wanted
                                .difference(&current)
                                .filter(|t| t.project_id() == Some(p))
                            {
                                let why = format!("{message} ({status})");
                                failed.push((t.clone(), refused(t, &why)));
                            }
                        }
                    }
                }
                Some(levels)
            } else {
                None
            };
            let changes = self
                .session
                .set_topics(self.tab, wanted, projects, hooked.as_ref());
            failed.extend(changes.refused.into_iter().map(|(t, e)| {
                let e = refused(&t, &e);
                (t, e)
            }));
            failed.extend(changes.unavailable.into_iter().map(|t| {
                let e = refused(&t, &NO_GITLAB);
                (t, e)
            }));
            let mut added = changes.added;
            for t in changes.channels {
                match self.subscribe(&t, None, None).await {
                    Ok(true) => added.push(t),
                    Ok(false) => {}
                    Err(e) => failed.push((t, e)),
                }
            }
            SetOutcome {
                removed: changes.removed,
                added,
                failed,
            }
        })
    }
}

/// Why a project topic is refused on a server without GitLab.
const NO_GITLAB: &str = "subscriptions are not configured on this server (gitlab.url)";
