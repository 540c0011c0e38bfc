//! One tab's connection after the upgrade: reports a refused credential in-band, joins the user's session, then
//! reads frames and dispatches commands until the tab closes.
//!
//! A bad message never closes the socket: it gets an `error` naming the problem, to that tab only.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;
use tracing::Instrument;

use crate::app::{App, TabSlot};
use crate::auth::{AuthError, Verified};
use crate::close_codes;
use crate::context::TabContext;
use crate::profile::Profile;
use crate::protocol;
use crate::rate::Bucket;
use crate::session::{AttachError, Session};
use crate::tab::{self, Keepalive, Tab};

/// Runs a tab from the upgrade to its end.
pub async fn run<S>(
    app: Arc<App>,
    ws: WebSocketStream<S>,
    auth: Result<Verified, AuthError>,
    peer: SocketAddr,
    profile: Profile,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let w = &app.config.websocket;
    let keepalive = Keepalive {
        ping_interval: Duration::from_millis(w.ping_interval_ms),
        idle_timeout: Duration::from_millis(w.idle_timeout_ms),
        write_timeout: Duration::from_millis(w.write_timeout_ms),
    };
    let (sink, mut stream) = ws.split();
    let (tab, outbox) = Tab::new(
        app.next_tab_id(),
        auth.as_ref().ok().and_then(|v| v.login.clone()),
        profile,
        w.outbound_queue_messages,
        w.outbound_queue_bytes,
        app.metrics.clone(),
    );
    let writer = tokio::spawn(tab::write_loop(tab.clone(), outbox, sink, keepalive));

    let verified = match auth {
        Ok(v) => v,
        Err(e) => {
            refuse(&tab, &e);
            finish(&app, &tab, writer).await;
            return;
        }
    };
    // Refused tabs get their error and close code, never `init` first.
    let Some(slot) = app.reserve_tab() else {
        let data =
            json!({"message": "The server is at capacity; retry later.", "overloaded": true});
        tab.send(protocol::encode("error", &data, None));
        tab.close(close_codes::TRY_AGAIN_LATER, "overloaded");
        finish(&app, &tab, writer).await;
        return;
    };
    let greeting = protocol::encode(
        "init",
        &json!({
            "message": "Connection established.",
            "user": verified.user.name,
            "instance": app.instance,
        }),
        None,
    );
    let session = match app.hub.join(&verified, &tab, greeting) {
        Ok(s) => s,
        Err(AttachError::TooManyTabs | AttachError::Stopped) => {
            let data = json!({"message": "Too many open tabs for this user.", "tooManyTabs": true});
            tab.send(protocol::encode("error", &data, None));
            tab.close(close_codes::TOO_MANY_TABS, "too many tabs");
            drop(slot);
            finish(&app, &tab, writer).await;
            return;
        }
    };
    // From here on the tab leaves its session however this task ends, a panic included.
    let membership = Membership {
        app: app.clone(),
        session: session.clone(),
        tab: tab.clone(),
        _slot: slot,
    };
    let span = tracing::info_span!(parent: &session.span, "tab", tab = tab.id);
    tracing::debug!(parent: &span, %peer, "tab joined");

    read_loop(&app, &session, &tab, &mut stream)
        .instrument(span.clone())
        .await;

    drop(membership);
    finish(&app, &tab, writer).await;
    tracing::debug!(parent: &span, "tab left");
}

/// A tab's place in its session and under `limits.max_connections`: dropping it closes the tab, leaves the
/// session and frees the place.
struct Membership {
    app: Arc<App>,
    session: Arc<Session>,
    tab: Arc<Tab>,
    _slot: TabSlot,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.tab.close(close_codes::NORMAL, "");
        self.app.hub.leave(&self.session, self.tab.id);
    }
}

/// Tells a tab why its credential was refused, then closes it with the matching code.
fn refuse(tab: &Tab, e: &AuthError) {
    let message = e.to_string();
    let (data, code) = match e {
        AuthError::Missing | AuthError::NoLogin => (
            json!({"message": message, "missingAuth": true}),
            close_codes::MISSING_AUTH,
        ),
        AuthError::Expired | AuthError::Revoked => (
            json!({"message": message, "authExpired": true}),
            close_codes::TOKEN_EXPIRED,
        ),
        AuthError::Invalid(_) => (
            json!({"message": message, "invalidToken": true}),
            close_codes::INVALID_TOKEN,
        ),
        AuthError::Unavailable | AuthError::Retry(_) => (
            json!({"message": message, "retry": true}),
            close_codes::TRY_AGAIN_LATER,
        ),
    };
    tab.send(protocol::encode("error", &data, None));
    tab.close(code, code.name);
}

async fn finish(app: &App, tab: &Tab, writer: tokio::task::JoinHandle<()>) {
    let _ = writer.await;
    let code = tab
        .close_request()
        .map(|(c, _)| c.code)
        .unwrap_or(close_codes::NORMAL.code);
    app.metrics.closes.inc(&[&code.to_string()]);
}

async fn read_loop<S>(app: &Arc<App>, session: &Arc<Session>, tab: &Arc<Tab>, stream: &mut S)
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    let limits = &app.config.limits;
    let command_timeout = Duration::from_millis(limits.command_timeout_ms);
    let mut bucket = Bucket::new(limits.commands_per_second, limits.commands_burst);
    let mut strikes = 0u32;
    loop {
        let frame = tokio::select! {
            biased;
            _ = tab.closed() => return,
            f = stream.next() => f,
        };
        let msg = match frame {
            None => return,
            Some(Err(WsError::Capacity(_))) => {
                tab.close(close_codes::MESSAGE_TOO_BIG, "message too big");
                return;
            }
            // RFC 6455 7.4.1: text that is not UTF-8 is 1007, any other violation of the protocol 1002; both are
            // counted by code in `tabhub_closes_total`, so a misbehaving client shows up.
            Some(Err(WsError::Utf8(_))) => {
                tab.close(close_codes::INVALID_PAYLOAD, "invalid UTF-8");
                return;
            }
            Some(Err(WsError::Protocol(_))) => {
                tab.close(close_codes::PROTOCOL_ERROR, "protocol error");
                return;
            }
            Some(Err(_)) => return,
            Some(Ok(m)) => m,
        };
        tab.touch();
        if matches!(msg, Message::Text(_) | Message::Binary(_)) {
            if !bucket.take() {
                strikes += 1;
                app.metrics.commands.inc(&["(any)", "rate_limited"]);
                if strikes >= limits.rate_limit_strikes {
                    tab.close(close_codes::RATE_LIMITED, "too many commands");
                    return;
                }
                tab.send(protocol::encode(
                    "error",
                    &json!({
                        "message": format!(
                            "rate limit: at most {} commands per second; this one was dropped",
                            limits.commands_per_second
                        ),
                        "rateLimited": true,
                    }),
                    None,
                ));
                continue;
            }
            strikes = 0;
        }
        match msg {
            Message::Text(text) => {
                tokio::select! {
                    biased;
                    _ = tab.closed() => return,
                    _ = session.turns().run(handle_text(app, session, tab, text.as_str(), command_timeout)) => {}
                }
                // One command per turn: frames already buffered are ready at once, so without this a tab that
                // sent its whole burst (40 commands of a hundred topics, say) would run them all before any
                // other tab's ping, and twenty such tabs held every other user for a tenth of a second.
                tokio::task::yield_now().await;
            }
            Message::Binary(_) => send_error(
                tab,
                "binary frames are not supported: send JSON text frames",
                None,
            ),
            Message::Close(_) => return,
            _ => {}
        }
    }
}

async fn handle_text(
    app: &Arc<App>,
    session: &Arc<Session>,
    tab: &Arc<Tab>,
    text: &str,
    timeout: Duration,
) {
    let req = match protocol::decode(text) {
        Ok(r) => r,
        Err(e) => {
            app.metrics.commands.inc(&["(invalid)", "bad_request"]);
            tab.send(protocol::encode(
                "error",
                &json!({"message": e.message}),
                e.id.as_ref(),
            ));
            return;
        }
    };
    let ctx = TabContext::new(session, tab, req.id.as_ref());
    // Unknown names must not grow the metrics without bound.
    let label = if app.registry.contains(&req.kind) {
        req.kind.as_str()
    } else {
        "(unknown)"
    };
    // A handler that panics is a bug in that command, not a reason to lose the tab: the panic stops at this
    // boundary, the tab gets an error (never the panic's text, which may quote the request), and reads on.
    let dispatch = AssertUnwindSafe(app.registry.dispatch(&req.kind, req.data.clone(), &ctx));
    let result = tokio::time::timeout(timeout, dispatch.catch_unwind()).await;
    let outcome = match result {
        Ok(Ok(Ok(()))) => "ok",
        Ok(Ok(Err(e))) => {
            send_error(tab, e.message(), req.id.as_ref());
            e.label()
        }
        Ok(Err(_panic)) => {
            tracing::error!(command = label, "command handler panicked");
            send_error(
                tab,
                "internal error while handling this command",
                req.id.as_ref(),
            );
            "panic"
        }
        Err(_) => {
            send_error(tab, "the command timed out", req.id.as_ref());
            "timeout"
        }
    };
    app.metrics.commands.inc(&[label, outcome]);
    // Whatever the command did to the user's topics, one upstream (re)start per project, now.
    session.flush_streams();
}

fn send_error(tab: &Tab, message: &str, id: Option<&Value>) {
    tab.send(protocol::encode(
        "error",
        &json!({ "message": message }),
        id,
    ));
}
