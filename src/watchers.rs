//! Which users of this instance follow each project (webhook source): a webhook event goes to their sessions only,
//! without looking at every session. A leaf, taken last in the lock order (a session may update it under its lock).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

#[derive(Default)]
pub struct Watchers {
    /// project -> users with at least one tab holding a topic of it.
    index: Mutex<HashMap<String, HashSet<String>>>,
}

impl Watchers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashSet<String>>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn add(&self, project: &str, user: &str) {
        self.lock()
            .entry(project.to_owned())
            .or_default()
            .insert(user.to_owned());
    }

    pub fn remove(&self, project: &str, user: &str) {
        let mut index = self.lock();
        if let Some(users) = index.get_mut(project) {
            users.remove(user);
            if users.is_empty() {
                index.remove(project);
            }
        }
    }

    /// The users following `project`.
    pub fn users(&self, project: &str) -> Vec<String> {
        self.lock()
            .get(project)
            .map(|u| u.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_remove() {
        let w = Watchers::default();
        w.add("1", "a");
        w.add("1", "b");
        w.remove("1", "a");
        assert_eq!(w.users("1"), ["b"]);
        w.remove("1", "b");
        assert!(w.users("1").is_empty() && w.lock().is_empty());
    }
}
