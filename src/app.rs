//! The application state shared by every request, tab and session.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// Publish-only channels: who holds them, their replay buffers.
    pub channels: crate::publish::channels::Channels,
    /// How published messages reach every instance.
    pub broker: crate::publish::broker::Broker,
    /// Upgrade rate per client address.
    pub upgrades: crate::rate::PerAddress,
    /// Open tabs, reserved before joining so that `limits.max_connections` holds under concurrency.
    open_tabs: AtomicUsize,
    next_tab: AtomicU64,
    draining: AtomicBool,
}

impl App {
    pub fn new(config: Config, registry: Registry) -> Arc<App> {
        crate::auth::crypto::install();
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
            channels: Default::default(),
            broker: crate::publish::broker::Broker::new(&config.broker),
            upgrades: crate::rate::PerAddress::new(
                config.limits.upgrades_per_second_per_address,
                config.limits.upgrades_burst,
            ),
            open_tabs: AtomicUsize::new(0),
            next_tab: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            config,
        })
    }

    pub fn next_tab_id(&self) -> u64 {
        self.next_tab.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves a place for a tab under `limits.max_connections`.
    pub fn reserve_tab(&self) -> bool {
        let max = self.config.limits.max_connections;
        let reserved = self.open_tabs.fetch_add(1, Ordering::AcqRel) + 1;
        if max > 0 && reserved > max {
            self.open_tabs.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        self.metrics.tabs.inc();
        true
    }

    pub fn release_tab(&self) {
        self.open_tabs.fetch_sub(1, Ordering::AcqRel);
        self.metrics.tabs.dec();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}
