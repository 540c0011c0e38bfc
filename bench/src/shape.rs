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
