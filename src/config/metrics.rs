//! `[metrics]`: who may read `/metrics`: a separate listener and/or an address allowlist.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::error::{key_error, ConfigError};

/// Where `/metrics` is served and to whom. The default (on the main listener, to anyone) keeps old deployments
/// working; the metrics name users, commands and backends, so a public instance should restrict them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// A separate listener for `/metrics` (for example `127.0.0.1:9100`, or the pod address Prometheus
    /// scrapes); the main listener then answers 404 there. Empty: `/metrics` on the main listener.
    pub listen: String,
    /// Networks allowed to read `/metrics` (CIDR like `10.0.0.0/8`, or a single address), checked against the
    /// connection's peer address, never `X-Forwarded-For`; others get 403. Empty: anyone.
    pub allow: Vec<String>,
}

impl MetricsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.allowlist().map(|_| ())
    }

    /// The separate listener's address, if one is configured.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|_| {
            key_error(
                "metrics.listen",
                "must be an address and port, e.g. 127.0.0.1:9100",
            )
        })
    }

    /// The parsed allowlist (empty: anyone).
    pub fn allowlist(&self) -> Result<Vec<Cidr>, ConfigError> {
        self.allow
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Cidr::parse(s).ok_or_else(|| {
                    key_error(
                        &format!("metrics.allow[{i}]"),
                        format!("{s:?} is not an address or a network (e.g. 10.0.0.0/8)"),
                    )
                })
            })
            .collect()
    }
}

/// A network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    len: u8,
}

impl Cidr {
    /// `a.b.c.d/n`, `x::y/n`, or a bare address (the whole address).
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, len) = match s.trim().split_once('/') {
            Some((a, l)) => (a.parse::<IpAddr>().ok()?, Some(l.parse::<u8>().ok()?)),
            None => (s.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        (len <= max).then_some(Cidr { net: addr, len })
    }

    /// Whether `ip` is in the network. An IPv4 peer seen on an IPv6 socket (`::ffff:a.b.c.d`) counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_contain_their_addresses_only() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let n = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(n.contains(ip("10.1.200.3")) && !n.contains(ip("10.2.0.1")));
        assert!(n.contains(ip("::ffff:10.1.0.9")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(!Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.2")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(!Cidr::parse("fd00::/8").unwrap().contains(ip("10.0.0.1")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("::1")));
        for bad in ["10.0.0.0/33", "10.0.0/8", "", "x", "::/129", "1.2.3.4/-1"] {
            assert_eq!(Cidr::parse(bad), None, "{bad}");
        }
    }
}
