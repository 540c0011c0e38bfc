//! Token buckets: per tab for commands, per client address for upgrades.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use tokio::time::Instant;

/// A token bucket: `rate` tokens per second, at most `burst`.
#[derive(Debug, Clone)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        Bucket {
            tokens: burst,
            last: Instant::now(),
            rate,
            burst,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn idle_full(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * self.rate
            >= self.burst
    }
}

/// One bucket per address. Buckets that refilled completely are forgotten when the map grows, so its size stays
/// bounded by the addresses active within one refill period.
pub struct PerAddress {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    rate: f64,
    burst: f64,
}

const PRUNE_AT: usize = 10_000;

impl PerAddress {
    pub fn new(rate: f64, burst: f64) -> Self {
        PerAddress {
            buckets: Mutex::new(HashMap::new()),
            rate,
            burst,
        }
    }

    /// Takes a token for `addr`.
    pub fn take(&self, addr: IpAddr) -> bool {
        let now = Instant::now();
        let mut m = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= PRUNE_AT {
            m.retain(|_, b| !b.idle_full(now));
        }
        m.entry(addr)
            .or_insert_with(|| Bucket::new(self.rate, self.burst))
            .take_at(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 3.0);
        assert!(b.take_at(t0) && b.take_at(t0) && b.take_at(t0));
        assert!(!b.take_at(t0));
        assert!(b.take_at(t0 + Duration::from_millis(100)));
        assert!(!b.take_at(t0 + Duration::from_millis(110)));
    }

    #[test]
    fn addresses_are_independent() {
        let p = PerAddress::new(1.0, 1.0);
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(p.take(a));
        assert!(!p.take(a));
        assert!(p.take(b));
    }
}
