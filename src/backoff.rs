//! Exponential backoff with full jitter (a random wait in `[0, delay]`), so that many clients or streams that failed
//! together do not retry together.

use std::time::Duration;

use rand::Rng;

/// A random duration in `[0, delay]`.
pub fn full_jitter(delay: Duration) -> Duration {
    let ms = delay.as_millis().min(u64::MAX as u128) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

/// Exponential backoff state: `initial`, doubling up to `max`; `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The wait before the next attempt (full jitter), and doubles the ceiling.
    pub fn next_delay(&mut self) -> Duration {
        let d = full_jitter(self.next);
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        for cap in [100, 200, 400, 800, 800] {
            assert!(b.next_delay() <= Duration::from_millis(cap));
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
