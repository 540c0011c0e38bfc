//! Token buckets: per tab for commands, per client address for upgrades and for custody's login routes.

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

/// One bucket per address, in a map bounded by [`MAX_ADDRESSES`]: the limiter faces unauthenticated peers, and an
/// attacker with many source addresses (an IPv6 prefix holds billions) must not grow it without end. When the map is
/// full, buckets that refilled completely are forgotten first (forgetting them changes nothing: a new bucket starts
/// full); if the addresses are all still active, the least recently used half goes (those addresses start again with
/// a full burst, which is what any new address gets anyway).
pub struct PerAddress {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    rate: f64,
    burst: f64,
}

/// The most addresses a [`PerAddress`] remembers (about 100 bytes each).
pub const MAX_ADDRESSES: usize = 10_000;

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
        self.take_at(addr, Instant::now())
    }

    fn take_at(&self, addr: IpAddr, now: Instant) -> bool {
        let mut m = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_ADDRESSES && !m.contains_key(&addr) {
            m.retain(|_, b| !b.idle_full(now));
            if m.len() >= MAX_ADDRESSES {
                // Evict the least recently used half: amortized, the next prune is MAX_ADDRESSES / 2 new
                // addresses away.
                let mut lasts: Vec<Instant> = m.values().map(|b| b.last).collect();
                let mid = lasts.len() / 2;
                let (_, cut, _) = lasts.select_nth_unstable(mid);
                let cut = *cut;
                m.retain(|_, b| b.last > cut);
            }
        }
        m.entry(addr)
            .or_insert_with(|| Bucket::new(self.rate, self.burst))
            .take_at(now)
    }

    /// How many addresses are remembered.
    pub fn len(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    #[test]
    fn the_map_stays_bounded_when_every_address_is_active() {
        // A slow refill: every bucket that took a token stays "active" for the whole test.
        let p = PerAddress::new(0.001, 1.0);
        let t0 = Instant::now();
        for i in 0..(3 * MAX_ADDRESSES as u32) {
            let addr = IpAddr::from(std::net::Ipv6Addr::from(
                0x2001_0db8_u128 << 96 | u128::from(i),
            ));
            assert!(p.take_at(addr, t0 + Duration::from_micros(u64::from(i))));
            assert!(p.len() <= MAX_ADDRESSES, "{} addresses remembered", p.len());
        }
        // The most recent addresses are still limited.
        let last = IpAddr::from(std::net::Ipv6Addr::from(
            0x2001_0db8_u128 << 96 | u128::from(3 * MAX_ADDRESSES as u32 - 1),
        ));
        assert!(!p.take_at(last, t0 + Duration::from_secs(1)));
    }
}
