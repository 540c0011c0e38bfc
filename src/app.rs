//! The application: a container built last, seen only by the HTTP layer (handshake, connection, publish API,
//! custody routes). Below it nothing holds the app: the hub and sessions hold [`Services`], the broker holds the
//! [`BatchHandler`](crate::publish::broker::BatchHandler) registered here.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tabhub_commands::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::Hub;
use crate::publish::broker::Broker;
use crate::publish::deliver::Delivery;
use crate::rate::PerAddress;
use crate::services::{Services, StartError};

pub struct App {
    pub services: Arc<Services>,
    pub hub: Arc<Hub>,
    pub registry: Registry,
    /// How published messages reach every instance.
    pub broker: Broker,
    /// Upgrade rate per client address.
    pub upgrades: PerAddress,
    /// Every connection task: the drain waits for them (their writers send the 1012 close frames).
    pub tasks: TaskTracker,
    /// Cancelled when the server stops: background tasks (broker listener, key-withdrawal rechecks) end.
    pub stop: CancellationToken,
    /// Open tabs, reserved before joining so that `limits.max_connections` holds under concurrency.
    open_tabs: AtomicUsize,
    next_tab: AtomicU64,
    draining: AtomicBool,
}

/// The HTTP layer reads configuration, metrics, realm and custody through the app as through the services.
impl Deref for App {
    type Target = Services;
    fn deref(&self) -> &Services {
        &self.services
    }
}

impl App {
    /// Builds the services, the hub and the broker; checks the commands' settings. Fails naming what is wrong.
    pub fn new(config: Config, registry: Registry) -> Result<Arc<App>, StartError> {
        let mut registry = registry;
        let settings = match serde_json::to_value(&config.commands) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        registry
            .configure(&settings)
            .map_err(StartError::Commands)?;
        let services = Services::new(config)?;
        let hub = Hub::new(services.clone());
        let delivery = Arc::new(Delivery {
            hub: hub.clone(),
            services: services.clone(),
        });
        let broker = Broker::new(
            &services.config.broker,
            delivery,
            services.history.clone(),
            services.metrics.clone(),
        );
        let limits = &services.config.limits;
        Ok(Arc::new(App {
            upgrades: PerAddress::new(
                limits.upgrades_per_second_per_address,
                limits.upgrades_burst,
            ),
            hub,
            registry,
            broker,
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            open_tabs: AtomicUsize::new(0),
            next_tab: AtomicU64::new(1),
            draining: AtomicBool::new(false),
            services,
        }))
    }

    pub fn next_tab_id(&self) -> u64 {
        self.next_tab.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves a place for a tab under `limits.max_connections`; the place is released when the returned guard
    /// drops, however the tab's task ends.
    pub fn reserve_tab(self: &Arc<Self>) -> Option<TabSlot> {
        let max = self.config.limits.max_connections;
        let reserved = self.open_tabs.fetch_add(1, Ordering::AcqRel) + 1;
        if max > 0 && reserved > max {
            self.open_tabs.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.metrics.tabs.inc();
        Some(TabSlot(self.clone()))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

/// A place under `limits.max_connections`, held while the tab is open.
pub struct TabSlot(Arc<App>);

impl Drop for TabSlot {
    fn drop(&mut self) {
        self.0.open_tabs.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.tabs.dec();
    }
}
