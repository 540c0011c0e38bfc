//! The shape of a scenario's load: groups of users with their tabs, topics, channels, instances and rates.

/// Users `from..to`, each with `tabs` tabs.
#[derive(Clone, Debug)]
pub struct Group {
    pub name: String,
    pub from: usize,
    pub to: usize,
    pub tabs: usize,
    /// Tab 0 of each user is reloaded during the loop measurement.
    pub reload: bool,
    /// The abuse scenario's attacker: its tabs get a client process of their own.
    pub attack: bool,
}

/// The `[limits]` tabhub runs with. The bench's own are wide open (its load comes from a few addresses and sends
/// as fast as it measures); the abuse scenario keeps tabhub's defaults for what a tab may do, since attacking
/// within them is the point.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_tabs_per_user: usize,
    pub commands_per_second: f64,
    pub commands_burst: f64,
}

impl Limits {
    pub fn wide_open() -> Limits {
        Limits {
            max_tabs_per_user: 0,
            commands_per_second: 1_000.0,
            commands_burst: 1_000.0,
        }
    }

    /// tabhub's defaults (`docs/configuration.md`, `[limits]`).
    pub fn tabhub_defaults() -> Limits {
        Limits {
            max_tabs_per_user: 100,
            commands_per_second: 20.0,
            commands_burst: 40.0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Shape {
    pub groups: Vec<Group>,
    pub topics: usize,
    /// Publish channels the users are spread over (each tab subscribes to its user's).
    pub channels: usize,
    /// tabhub instances (more than one: they share a Redis broker).
    pub instances: usize,
    pub rate: f64,
    pub duration: f64,
    pub short_interval_ms: u64,
    pub limits: Limits,
    /// `gitlab.source`: `sse`, or `webhook` (the webhooks scenario).
    pub source: &'static str,
}

impl Shape {
    pub fn users(&self) -> usize {
        self.groups.iter().map(|g| g.to).max().unwrap_or(0)
    }

    pub fn tabs(&self) -> usize {
        self.groups.iter().map(|g| (g.to - g.from) * g.tabs).sum()
    }

    pub fn tabs_of(&self, user: usize) -> usize {
        self.groups
            .iter()
            .find(|g| user >= g.from && user < g.to)
            .map_or(0, |g| g.tabs)
    }
}
