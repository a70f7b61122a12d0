//! The key table: every key of a snapshot, packed so that a million keys cost tens of
//! megabytes, not hundreds.
//!
//! Per key it holds a 40-byte slot (digest, where its id is, its environment) in one
//! array sorted by digest, an 8-byte usage pointer that is filled on the key's first
//! request, and the id itself in one shared arena. A lookup takes the digest's top bits
//! to a run of four to eight slots (SHA-256 digests are uniform) and compares digests
//! there: a few adjacent cache lines, whatever the number of keys. A `HashMap` of entries with an `Arc`
//! per id and per usage counter cost ~400 bytes per key; this costs ~57.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderValue;
use once_cell::race::OnceBox;

use super::{KeyId, KeyUsage};
use crate::config::KeyConfig;
use crate::digest::KeyDigest;

/// Keys per directory bucket at least, on average (the bucket count is a power of two at
/// or below `keys / 4`, so 4 to 8): a short scan of adjacent slots, and a directory of at
/// most one byte per key.
const SLOTS_PER_BUCKET: usize = 4;

pub struct KeyTable {
    /// Sorted by digest.
    slots: Box<[Slot]>,
    /// `starts[b]..starts[b + 1]` are the slots whose digest begins with the `bits`
    /// bits of `b`.
    starts: Box<[u32]>,
    bits: u32,
    /// Every id followed by `\n`: environments in config order, keys in file order.
    ids: Bytes,
    /// Each environment's part of `ids`, and its name.
    environments: Vec<(Arc<str>, Range<usize>)>,
    /// Validity windows, by slot index: only keys that have one pay for it.
    windows: HashMap<u32, Window>,
    /// By slot index; set on a key's first request, or carried over from the previous
    /// table when the key remains.
    usage: Box<[OnceBox<Arc<KeyUsage>>]>,
}

#[derive(Clone, Copy)]
struct Slot {
    digest: KeyDigest,
    id_start: u32,
    id_len: u8,
    has_window: bool,
    environment: u16,
}

#[derive(Clone, Copy, Default)]
pub struct Window {
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
}

/// A key found by [`KeyTable::find`].
pub struct Found<'t> {
    table: &'t KeyTable,
    index: usize,
}

/// One key, for listings (`/keys`, reload summaries).
pub struct KeyView<'t> {
    pub environment: usize,
    pub id: &'t str,
    pub digest: &'t KeyDigest,
    pub window: Window,
    /// `None` until the key has served a request.
    pub usage: Option<&'t KeyUsage>,
}

impl KeyTable {
    /// `lists` holds each environment's name and keys, in config order. Usage counters
    /// of keys that remain (same environment, same id) are taken over from `previous`.
    ///
    /// Key ids are at most 128 bytes and environments far fewer than 65,536 (both
    /// enforced by config validation), which is what the slot's narrow fields assume.
    pub fn build(lists: Vec<(&str, Vec<KeyConfig>)>, previous: Option<&KeyTable>) -> KeyTable {
        let count: usize = lists.iter().map(|(_, keys)| keys.len()).sum();
        let mut ids = Vec::with_capacity(
            lists
                .iter()
                .flat_map(|(_, k)| k)
                .map(|k| k.id.len() + 1)
                .sum(),
        );
        let mut slots = Vec::with_capacity(count);
        let mut windows = Vec::new();
        let mut environments = Vec::with_capacity(lists.len());
        for (env, (name, keys)) in lists.into_iter().enumerate() {
            let start = ids.len();
            for key in keys {
                let id_start = u32::try_from(ids.len()).expect("key ids total under 4 GiB");
                ids.extend_from_slice(key.id.as_bytes());
                ids.push(b'\n');
                let window = Window {
                    not_before: key.not_before,
                    not_after: key.not_after,
                };
                let has_window = window.not_before.is_some() || window.not_after.is_some();
                if has_window {
                    windows.push((key.sha256, window));
                }
                slots.push(Slot {
                    digest: key.sha256,
                    id_start,
                    id_len: u8::try_from(key.id.len()).expect("validated: ids are <= 128 bytes"),
                    has_window,
                    environment: u16::try_from(env).expect("fewer than 65,536 environments"),
                });
            }
            environments.push((Arc::from(name), start..ids.len()));
        }
        slots.sort_unstable_by_key(|s| s.digest);

        let bits = (count / SLOTS_PER_BUCKET).max(1).ilog2().min(24);
        let mut starts = vec![0u32; (1 << bits) + 1];
        for slot in &slots {
            starts[bucket(&slot.digest, bits) + 1] += 1;
        }
        for b in 1..starts.len() {
            starts[b] += starts[b - 1];
        }

        let mut table = KeyTable {
            usage: (0..slots.len()).map(|_| OnceBox::new()).collect(),
            slots: slots.into_boxed_slice(),
            starts: starts.into_boxed_slice(),
            bits,
            ids: Bytes::from(ids),
            environments,
            windows: HashMap::new(),
        };
        table.windows = windows
            .into_iter()
            .filter_map(|(digest, w)| Some((table.position(&digest)? as u32, w)))
            .collect();
        if let Some(previous) = previous {
            table.carry_usage(previous);
        }
        table
    }

    fn carry_usage(&self, previous: &KeyTable) {
        let used: HashMap<(&str, &str), &Arc<KeyUsage>> = (0..previous.slots.len())
            .filter_map(|i| {
                let usage = previous.usage[i].get()?;
                let slot = &previous.slots[i];
                Some((
                    (
                        &*previous.environments[slot.environment as usize].0,
                        previous.id(slot),
                    ),
                    usage,
                ))
            })
            .collect();
        if used.is_empty() {
            return;
        }
        for (i, slot) in self.slots.iter().enumerate() {
            let name = &*self.environments[slot.environment as usize].0;
            if let Some(usage) = used.get(&(name, self.id(slot))) {
                let _ = self.usage[i].set(Box::new(Arc::clone(usage)));
            }
        }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn find(&self, digest: &KeyDigest) -> Option<Found<'_>> {
        self.position(digest)
            .map(|index| Found { table: self, index })
    }

    fn position(&self, digest: &KeyDigest) -> Option<usize> {
        let b = bucket(digest, self.bits);
        let run = self.starts[b] as usize..self.starts[b + 1] as usize;
        let offset = self.slots[run.clone()]
            .iter()
            .position(|s| s.digest == *digest)?;
        Some(run.start + offset)
    }

    fn id(&self, slot: &Slot) -> &str {
        let start = slot.id_start as usize;
        id_str(&self.ids[start..start + slot.id_len as usize])
    }

    /// An environment's key ids, in file order.
    pub fn ids_of(&self, environment: usize) -> impl Iterator<Item = &str> {
        let range = self
            .environments
            .get(environment)
            .map_or(0..0, |(_, r)| r.clone());
        id_str(&self.ids[range]).lines()
    }

    /// Every key, in digest order.
    pub fn iter(&self) -> impl Iterator<Item = KeyView<'_>> {
        self.slots.iter().enumerate().map(|(i, slot)| KeyView {
            environment: slot.environment as usize,
            id: self.id(slot),
            digest: &slot.digest,
            window: self.window_at(i),
            usage: self.usage[i].get().map(|u| &**u),
        })
    }

    fn window_at(&self, index: usize) -> Window {
        if !self.slots[index].has_window {
            return Window::default();
        }
        self.windows
            .get(&(index as u32))
            .copied()
            .unwrap_or_default()
    }
}

impl<'t> Found<'t> {
    fn slot(&self) -> &'t Slot {
        &self.table.slots[self.index]
    }

    pub fn environment(&self) -> usize {
        self.slot().environment as usize
    }

    /// The key's id, sharing the table's arena (no copy).
    pub fn id(&self) -> KeyId {
        let slot = self.slot();
        let start = slot.id_start as usize;
        let bytes = self.table.ids.slice(start..start + slot.id_len as usize);
        // Ids were validated at load time (visible ASCII), which is all a header value needs.
        KeyId(HeaderValue::from_maybe_shared(bytes).expect("validated key id"))
    }

    pub fn window(&self) -> Window {
        self.table.window_at(self.index)
    }

    /// The key's usage counters, created on its first request.
    pub fn usage(&self) -> &'t KeyUsage {
        self.table.usage[self.index].get_or_init(|| Box::new(Arc::default()))
    }
}

fn bucket(digest: &KeyDigest, bits: u32) -> usize {
    let top = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    top.checked_shr(32 - bits).unwrap_or(0) as usize
}

/// Ids are validated ASCII at load time; a failure here would only hide an id.
fn id_str(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::sha256;

    fn key(id: &str) -> KeyConfig {
        KeyConfig {
            id: id.to_owned(),
            sha256: sha256(format!("secret-{id}").as_bytes()),
            not_before: None,
            not_after: None,
        }
    }

    fn table(sizes: &[usize], previous: Option<&KeyTable>) -> KeyTable {
        let lists = sizes
            .iter()
            .enumerate()
            .map(|(e, &n)| {
                let name = ["dev", "qa", "prod"][e];
                (name, (0..n).map(|i| key(&format!("{name}-{i}"))).collect())
            })
            .collect();
        KeyTable::build(lists, previous)
    }

    #[test]
    fn finds_every_key_and_nothing_else_at_every_size() {
        for n in [0, 1, 3, 4, 5, 17, 1000, 40_000] {
            let t = table(&[n, 2], None);
            assert_eq!(t.len(), n + 2);
            for i in 0..n {
                let found = t
                    .find(&sha256(format!("secret-dev-{i}").as_bytes()))
                    .expect("present");
                assert_eq!(found.environment(), 0);
                assert_eq!(found.id().as_str(), format!("dev-{i}"));
            }
            let qa = t.find(&sha256(b"secret-qa-1")).expect("present");
            assert_eq!((qa.environment(), qa.id().as_str()), (1, "qa-1"));
            assert!(t.find(&sha256(b"secret-dev-unknown")).is_none());
            assert!(t
                .find(&sha256(format!("secret-dev-{n}").as_bytes()))
                .is_none());
        }
    }

    #[test]
    fn ids_stay_in_file_order_per_environment() {
        let t = table(&[3, 0, 2], None);
        assert_eq!(t.ids_of(0).collect::<Vec<_>>(), ["dev-0", "dev-1", "dev-2"]);
        assert_eq!(t.ids_of(1).count(), 0);
        assert_eq!(t.ids_of(2).collect::<Vec<_>>(), ["prod-0", "prod-1"]);
        assert_eq!(t.ids_of(9).count(), 0);
    }

    #[test]
    fn windows_belong_to_their_key_only() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let mut keys: Vec<KeyConfig> = (0..50).map(|i| key(&format!("k{i}"))).collect();
        keys[7].not_after = Some(at);
        keys[8].not_before = Some(at);
        let t = KeyTable::build(vec![("dev", keys)], None);
        let window = |id: &str| {
            t.find(&sha256(format!("secret-{id}").as_bytes()))
                .unwrap()
                .window()
        };
        assert_eq!(window("k7").not_after, Some(at));
        assert_eq!(window("k8").not_before, Some(at));
        assert!(window("k9").not_before.is_none() && window("k9").not_after.is_none());
        assert_eq!(t.iter().filter(|k| k.window.not_after.is_some()).count(), 1);
    }

    #[test]
    fn usage_is_created_on_first_use_and_survives_a_rebuild_for_remaining_keys() {
        let old = table(&[2, 1], None);
        let find = |t: &KeyTable, secret: &str| {
            t.find(&sha256(secret.as_bytes())).unwrap().usage() as *const KeyUsage
        };
        assert_eq!(old.iter().filter(|k| k.usage.is_some()).count(), 0);
        let dev0 = find(&old, "secret-dev-0");
        let qa0 = find(&old, "secret-qa-0");
        assert_eq!(find(&old, "secret-dev-0"), dev0, "one counter per key");

        // dev-0 remains; qa loses qa-0; a new dev-9 appears.
        let mut dev = vec![key("dev-0"), key("dev-9")];
        dev[1].sha256 = sha256(b"other");
        let new = KeyTable::build(vec![("dev", dev), ("qa", vec![key("qa-1")])], Some(&old));
        assert_eq!(find(&new, "secret-dev-0"), dev0);
        assert_ne!(find(&new, "other"), qa0);
        assert_eq!(new.iter().filter(|k| k.usage.is_some()).count(), 2);
    }

    #[test]
    fn a_slot_is_forty_bytes() {
        assert_eq!(std::mem::size_of::<Slot>(), 40);
        assert_eq!(std::mem::size_of::<OnceBox<Arc<KeyUsage>>>(), 8);
    }
}
