//! Open connections per client address, for `[limits] max_connections_per_ip`: one
//! address holding idle connections must not lock everyone else out of
//! `max_connections`.
//!
//! Cost: one map entry per address with open connections (removed at zero), one
//! shard lock on accept and on close; nothing at all while the limit is unset.

use std::net::IpAddr;
use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;

#[derive(Debug, Default)]
pub struct PerIp(DashMap<IpAddr, usize>);

/// One connection's place under its address's limit; released on drop.
#[derive(Debug)]
pub struct IpSlot {
    counts: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// A place for one more connection from `ip`, or `None` when it already holds `max`.
    pub fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut open = self.0.entry(ip).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(IpSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Entry::Occupied(mut open) = self.counts.0.entry(self.ip) {
            *open.get_mut() -= 1;
            if *open.get() == 0 {
                open.remove();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_max_places_and_gets_them_back() {
        let counts = Arc::new(PerIp::default());
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let held: Vec<IpSlot> = (0..2).filter_map(|_| counts.enter(a, 2)).collect();
        assert_eq!(held.len(), 2);
        assert!(counts.enter(a, 2).is_none());
        assert!(counts.enter(b, 2).is_some());
        drop(held);
        assert!(counts.enter(a, 2).is_some());
        drop(counts.enter(b, 2));
        assert!(counts.0.is_empty(), "entries at zero are removed");
    }
}
