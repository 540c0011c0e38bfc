//! Every built-in command, and every loop function it registers, against arbitrary parameters and arbitrary backend
//! answers: nothing may panic. Strings are drawn with multi-byte characters, combining marks and dot segments on
//! purpose (a byte-index `truncate` inside a character once panicked a handler and leaked its tab).

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use proptest::prelude::*;
use serde_json::{Map, Value};
use tabhub_commands::{
    BackendError, BackendResponse, BoxFuture, CommandError, Context, LoopContext, LoopFunction,
    Notification, SessionData, Topic, User,
};

/// The context of one tab and its session, with every call answered at once.
struct Fake {
    user: User,
    data: SessionData,
    loops: Mutex<Vec<LoopFunction>>,
    subs: Mutex<BTreeSet<String>>,
    answer: BackendResponse,
}

impl Fake {
    fn new(answer: BackendResponse) -> Fake {
        Fake {
            user: User {
                id: "u".into(),
                name: "u".into(),
            },
            data: SessionData::default(),
            loops: Mutex::default(),
            subs: Mutex::default(),
            answer,
        }
    }
}

impl LoopContext for Fake {
    fn user(&self) -> &User {
        &self.user
    }
    fn session_data(&self) -> &SessionData {
        &self.data
    }
    fn backend_get<'a>(
        &'a self,
        _backend: &'a str,
        _path: &'a str,
    ) -> BoxFuture<'a, Result<BackendResponse, BackendError>> {
        let answer = self.answer.clone();
        Box::pin(async move { Ok(answer) })
    }
    fn shared_get<'a>(
        &'a self,
        _url: &'a str,
    ) -> BoxFuture<'a, Result<BackendResponse, BackendError>> {
        let answer = self.answer.clone();
        Box::pin(async move { Ok(answer) })
    }
}

impl Context for Fake {
    fn instance(&self) -> &str {
        "fuzz"
    }
    fn reply(&self, _kind: &str, _data: Value) {}
    fn notify_user(&self, _kind: &str, _data: Value) {}
    fn register_loop(&self, function: LoopFunction) -> bool {
        let mut loops = self.loops.lock().unwrap();
        if loops.iter().any(|f| f.name == function.name) {
            return false;
        }
        loops.push(function);
        true
    }
    fn snapshot(&self, _function: &str) -> Option<Vec<Notification>> {
        None
    }
    fn run_loop_now(&self, _function: &str) {}
    fn set_hidden(&self, _hidden: bool) {}
    fn authenticate<'a>(&'a self, _token: &'a str) -> BoxFuture<'a, Result<Value, CommandError>> {
        Box::pin(async { Ok(Value::Null) })
    }
    fn subscribe<'a>(
        &'a self,
        topic: &'a Topic,
        _last_event_id: Option<&'a str>,
        _reply: Option<Notification>,
    ) -> BoxFuture<'a, Result<bool, CommandError>> {
        let added = self.subs.lock().unwrap().insert(topic.to_string());
        Box::pin(async move { Ok(added) })
    }
    fn unsubscribe(&self, topic: &Topic) -> bool {
        self.subs.lock().unwrap().remove(&topic.to_string())
    }
    fn subscriptions(&self) -> Vec<Topic> {
        let subs = self.subs.lock().unwrap();
        subs.iter().filter_map(|t| Topic::parse(t).ok()).collect()
    }
}

/// Runs a future whose every await is ready at once (the fake context answers at once).
fn run<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(Waker::noop());
    for _ in 0..10_000 {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("the future did not finish although every call answers at once");
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,40}",
        "[é€😀a\u{301}%./0-9a-zA-Z_-]{0,90}",
        Just("..".to_owned()),
        Just("%2e%2e".to_owned()),
        Just("/project/1/push".to_owned()),
        Just("/events/x".to_owned()),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 48, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map(text(), inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A parameter value: any JSON, or a list of strings (what list parameters such as `projects` and `topics` take,
/// so that the strings reach the code that checks them).
fn param() -> impl Strategy<Value = Value> {
    prop_oneof![
        json(),
        prop::collection::vec(text().prop_map(Value::from), 0..4).prop_map(Value::Array),
        text().prop_map(Value::from),
    ]
}

/// A backend answer: a status a backend may give and any body, `{"progress": {"percentage": x}}` shapes included.
fn answer() -> impl Strategy<Value = BackendResponse> {
    let status = prop_oneof![Just(200u16), Just(404), Just(500), any::<u16>()];
    let body = prop_oneof![
        json(),
        json().prop_map(|x| serde_json::json!({"progress": {"percentage": x}})),
        prop::collection::vec(json(), 0..4).prop_map(Value::Array),
    ];
    (status, body).prop_map(|(status, body)| BackendResponse { status, body })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Each case sends every command the same arbitrary values, then runs the loop functions they registered.
    #[test]
    fn no_command_nor_its_loop_panics(
        values in prop::collection::vec(param(), 4),
        extra in prop::option::of((text(), json())),
        answer in answer(),
        omit in any::<bool>(),
    ) {
        let registry = tabhub_commands::builtin();
        let ctx = Arc::new(Fake::new(answer));
        for info in registry.describe() {
            // Every parameter the command knows, with arbitrary values; sometimes the optional ones left out,
            // sometimes a key it does not know.
            let mut data = Map::new();
            for (i, key) in info.required.iter().chain(info.optional.iter()).enumerate() {
                if omit && i >= info.required.len() {
                    continue;
                }
                data.insert((*key).to_owned(), values[i % values.len()].clone());
            }
            if let Some((k, v)) = &extra {
                data.insert(k.clone(), v.clone());
            }
            let _ = run(registry.dispatch(info.name, data, ctx.as_ref()));
        }
        let loops: Vec<LoopFunction> = ctx.loops.lock().unwrap().clone();
        for f in loops {
            for _ in 0..2 {
                let _ = run(f.run(ctx.clone()));
            }
        }
    }
}

/// The multi-byte ids that once panicked a handler are refused with a message.
#[test]
fn the_old_panic_is_refused_with_a_message() {
    let registry = tabhub_commands::builtin();
    let ctx = Fake::new(BackendResponse {
        status: 200,
        body: Value::Null,
    });
    let mut data = Map::new();
    data.insert("projects".into(), serde_json::json!(["é".repeat(40)]));
    let r = run(registry.dispatch("pullKgActivationStatus", data, &ctx));
    assert!(matches!(r, Err(CommandError::BadParams(m)) if m.contains("invalid project id")));
}
