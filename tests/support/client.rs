//! A websocket test client: connects with a credential in any of the accepted places, sends commands, and receives
//! messages with bounded waits.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::WAIT;

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Headers of the 101 answer.
    pub response_headers: axum::http::HeaderMap,
}

/// How the token is presented.
pub enum Cred<'a> {
    None,
    Header(&'a str),
    Cookie(&'a str, &'a str),
    Subprotocol(&'a str),
}

impl Client {
    /// Connects with the token in the Authorization header, then reads the `init` message.
    pub async fn connect(url: &str, token: &str) -> Client {
        let mut c = Client::connect_with(url, Cred::Header(token), None)
            .await
            .unwrap();
        let init = c.recv().await;
        assert_eq!(init["type"], "init", "first message must be init: {init}");
        c
    }

    /// Connects without reading anything.
    pub async fn connect_with(
        url: &str,
        cred: Cred<'_>,
        origin: Option<&str>,
    ) -> Result<Client, WsError> {
        let mut req = url.into_client_request().unwrap();
        let h = req.headers_mut();
        // The tabhub profile: the whole protocol (a tab offering no subprotocol is Renku's client).
        h.insert("sec-websocket-protocol", "tabhub".parse().unwrap());
        match cred {
            Cred::None => {}
            Cred::Header(t) => {
                h.insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            Cred::Cookie(name, t) => {
                h.insert("cookie", format!("other=1; {name}={t}").parse().unwrap());
            }
            Cred::Subprotocol(t) => {
                h.insert(
                    "sec-websocket-protocol",
                    format!("tabhub, tabhub.bearer.{t}").parse().unwrap(),
                );
            }
        }
        if let Some(o) = origin {
            h.insert("origin", o.parse().unwrap());
        }
        let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
        Ok(Client {
            ws,
            response_headers: resp.headers().clone(),
        })
    }

    /// Sends `{"type": kind, "data": data}` (plus `id` when given).
    pub async fn send(&mut self, kind: &str, data: Value, id: Option<Value>) {
        let mut m = json!({"timestamp": "2026-01-01T00:00:00Z", "type": kind, "data": data});
        if let Some(id) = id {
            m["id"] = id;
        }
        self.send_raw(&m.to_string()).await;
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    pub async fn send_message(&mut self, m: Message) -> Result<(), WsError> {
        self.ws.send(m).await
    }

    /// The next text message, as JSON (panics on close or after [`WAIT`]).
    pub async fn recv(&mut self) -> Value {
        match self.next_within(WAIT).await {
            Some(v) => v,
            None => panic!("no message within {WAIT:?}"),
        }
    }

    /// The next text message within `d`, or None (on timeout or close).
    pub async fn next_within(&mut self, d: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()??;
            match msg {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).unwrap()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Skips messages until one of type `kind` arrives.
    pub async fn recv_type(&mut self, kind: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == kind {
                return v;
            }
        }
    }

    /// Asserts nothing arrives within `d`.
    pub async fn expect_silence(&mut self, d: Duration) {
        if let Some(v) = self.next_within(d).await {
            panic!("expected no message, got {v}");
        }
    }

    /// Reads until the server closes; returns the close code and the text messages received before it.
    pub async fn closed(&mut self) -> (Option<u16>, Vec<Value>) {
        self.closed_within(WAIT).await
    }

    /// [`Client::closed`] with another bound.
    pub async fn closed_within(&mut self, bound: Duration) -> (Option<u16>, Vec<Value>) {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("server did not close the socket in time");
            match next {
                Some(Ok(Message::Text(t))) => got.push(serde_json::from_str(t.as_str()).unwrap()),
                Some(Ok(Message::Close(f))) => return (f.map(|f| u16::from(f.code)), got),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return (None, got),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
        // Drain until the server's close answer so the server sees a clean close.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.ws.next().await.is_some() {}
        })
        .await;
    }
}

impl Client {
    /// Writes raw bytes on the socket, under the websocket layer: for frames a well-behaved client never sends.
    pub async fn send_raw_bytes(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        match self.ws.get_mut() {
            MaybeTlsStream::Plain(s) => s.write_all(bytes).await.unwrap(),
            _ => panic!("raw bytes on a plain socket only"),
        }
    }

    /// Connects with a prepared request (any URL and headers: credentials, cookies, tags), without reading
    /// anything.
    pub async fn connect_request(
        mut req: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<Client, WsError> {
        if !req.headers().contains_key("sec-websocket-protocol") {
            req.headers_mut()
                .insert("sec-websocket-protocol", "tabhub".parse().unwrap());
        }
        let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
        Ok(Client {
            ws,
            response_headers: resp.headers().clone(),
        })
    }
}
