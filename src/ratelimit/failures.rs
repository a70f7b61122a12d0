//! Failed authentications per client address (`[limits] unauthenticated`): a client
//! that keeps presenting missing, unknown or expired keys is told 429
//! `too_many_failed_authentications` once it used up its allowance, instead of being
//! answered 401 at whatever rate it can guess.
//!
//! Only failures are charged: a valid key from the same address (a NAT neighbour of a
//! guesser) is never refused by this. The key lookup itself still runs (one SHA-256,
//! about 0.2 µs); what the limit stops is the guessing.
//!
//! Memory: one governor cell per address that failed recently; idle cells are dropped
//! by the same sweep as the per-key buckets.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::RateLimiter;

use crate::config::QuotaConfig;

type ByAddress = RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>;

pub struct FailedAuthLimiter {
    config: QuotaConfig,
    limiter: Arc<ByAddress>,
}

impl FailedAuthLimiter {
    /// The previous limiter when its quota is unchanged (a reload forgives no one),
    /// else a new one.
    pub fn carry_over(config: QuotaConfig, previous: Option<&FailedAuthLimiter>) -> Self {
        let limiter = previous
            .filter(|p| p.config == config)
            .map(|p| p.limiter.clone())
            .unwrap_or_else(|| Arc::new(RateLimiter::keyed(super::quota(&config))));
        FailedAuthLimiter { config, limiter }
    }

    /// Charges one failed authentication to `ip`; `Err` carries how long until the
    /// address may fail again.
    pub fn charge(&self, ip: IpAddr) -> Result<(), Duration> {
        self.limiter
            .check_key(&ip)
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }

    pub fn retain_recent(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    #[test]
    fn an_address_is_refused_after_its_allowance_and_others_are_not() {
        let q = QuotaConfig {
            requests: NonZeroU32::new(3).unwrap(),
            per: Duration::from_secs(60),
            burst: NonZeroU32::new(3).unwrap(),
        };
        let limiter = FailedAuthLimiter::carry_over(q, None);
        let (guesser, neighbour): (IpAddr, IpAddr) =
            ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for _ in 0..3 {
            assert!(limiter.charge(guesser).is_ok());
        }
        let wait = limiter.charge(guesser).unwrap_err();
        assert!(
            wait > Duration::from_secs(10) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(limiter.charge(neighbour).is_ok());
        let reloaded = FailedAuthLimiter::carry_over(q, Some(&limiter));
        assert!(
            reloaded.charge(guesser).is_err(),
            "a reload forgave the guesser"
        );
    }
}
