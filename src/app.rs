//! The application state shared by every request, tab and session.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{Map, Value};
use tabhub_commands::Registry;

use crate::auth::Realm;
use crate::backends::Backends;
use crate::config::Config;
use crate::custody::Custody;
use crate::hub::Hub;
use crate::metrics::Metrics;

pub struct App {
    pub config: Config,
    pub registry: Registry,
    pub realm: Arc<Realm>,
    pub hub: Hub,
    pub backends: Backends,
    /// Token custody (login, server-side tokens), when enabled.
    pub custody: Option<Arc<Custody>>,
    /// The HTTP client of upstream SSE streams (see [`crate::upstream`]).
    pub upstream: reqwest::Client,
    /// The `[commands]` table as JSON, handed to commands.
    pub settings: Map<String, Value>,
    /// Shown in `init`; distinguishes instances behind a load balancer.
    pub instance: String,
    pub metrics: Arc<Metrics>,
    next_tab: AtomicU64,
    draining: AtomicBool,
}

impl App {
    pub fn new(config: Config, registry: Registry) -> Arc<App> {
        let metrics = Arc::new(Metrics::default());
        let settings = match serde_json::to_value(&config.commands) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let instance = if config.instance_id.is_empty() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "tabhub".into());
            format!("{host}-{}", std::process::id())
        } else {
            config.instance_id.clone()
        };
        let realm = Realm::new(config.auth.clone());
        let custody = config
            .custody
            .enabled
            .then(|| Arc::new(Custody::new(&config, realm.clone(), metrics.clone())));
        Arc::new(App {
            realm,
            custody,
            backends: Backends::new(&config, metrics.clone()),
            upstream: crate::upstream::client(&config.gitlab),
            hub: Hub::default(),
            registry,
            settings,
            instance,
            metrics,
            next_tab: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            config,
        })
    }

    pub fn next_tab_id(&self) -> u64 {
        self.next_tab.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}
