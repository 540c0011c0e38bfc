//! Typed state a command keeps on the user's session, shared by its handler (every tab) and its loop function.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One value per type: a command defines its own state type and gets the session's single instance of it.
#[derive(Default)]
pub struct SessionData {
    slots: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
}

impl SessionData {
    /// The session's instance of `T`, created with `T::default()` on first use.
    pub fn get<T: Any + Default + Send + Sync>(&self) -> Arc<T> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let slot = slots
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()) as Arc<dyn Any + Send + Sync>)
            .clone();
        drop(slots);
        // The map is keyed by the TypeId of the value it holds, so the downcast cannot fail.
        slot.downcast::<T>()
            .unwrap_or_else(|_| unreachable!("SessionData slot keyed by TypeId holds that type"))
    }
}

impl std::fmt::Debug for SessionData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionData")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    struct Counter(AtomicU32);

    #[test]
    fn one_instance_per_type() {
        let data = SessionData::default();
        data.get::<Counter>().0.fetch_add(2, Ordering::Relaxed);
        assert_eq!(data.get::<Counter>().0.load(Ordering::Relaxed), 2);
        assert_eq!(*data.get::<String>(), "");
    }
}
