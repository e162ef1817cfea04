//! The boundary to proxy-wasm shared data: one key-value store that every worker VM with the
//! same `vm_id` sees, with compare-and-swap writes. The glue implements it over host calls; tests
//! use [`MemoryStore`], which mirrors Envoy's semantics and can inject CAS conflicts.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Another writer got there first; re-read and try again.
    CasMismatch,
    /// The host refused the call; carries the proxy-wasm status code.
    Host(u32),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CasMismatch => f.write_str("compare-and-swap mismatch"),
            Self::Host(status) => write!(f, "shared-data host call failed with status {status}"),
        }
    }
}

pub trait SharedStore {
    /// The value and its CAS token, or `None` when the key was never written.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;

    /// Writes `value` if the key's CAS token still equals `cas`. As in Envoy, `cas == 0` writes
    /// unconditionally, and a key that does not exist yet is created whatever `cas` says.
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError>;
}

impl<S: SharedStore + ?Sized> SharedStore for &S {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        (**self).get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        (**self).set(key, value, cas)
    }
}

/// An in-process store with Envoy's CAS rules, shareable between threads, used by the native
/// tests to play many workers against one table.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

#[derive(Default)]
struct MemoryInner {
    entries: HashMap<String, (Vec<u8>, u32)>,
    /// The next this-many conditional writes fail as if another worker had written first.
    injected_conflicts: u32,
    /// Every host call fails with this status while set.
    failing_status: Option<u32>,
    conflicts_seen: u64,
    writes: u64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next `n` conditional writes lose the race: the value is untouched but its CAS
    /// token moves on, exactly what a concurrent writer of the same bytes would cause.
    pub fn inject_conflicts(&self, n: u32) {
        self.lock().injected_conflicts += n;
    }

    /// Simulates host-call failures (e.g. a status the SDK would otherwise panic on).
    pub fn fail_with(&self, status: Option<u32>) {
        self.lock().failing_status = status;
    }

    pub fn conflicts_seen(&self) -> u64 {
        self.lock().conflicts_seen
    }

    pub fn writes(&self) -> u64 {
        self.lock().writes
    }

    pub fn raw(&self, key: &str) -> Option<Vec<u8>> {
        self.lock().entries.get(key).map(|(v, _)| v.clone())
    }

    /// Overwrites a key behind everyone's back, like an unconditional write by another VM.
    pub fn overwrite(&self, key: &str, value: &[u8]) {
        let mut inner = self.lock();
        let cas = inner
            .entries
            .get(key)
            .map_or(1, |(_, c)| c.wrapping_add(1).max(1));
        inner.entries.insert(key.to_owned(), (value.to_vec(), cas));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // A test thread that panicked while holding the lock already failed its test; the data
        // is still consistent because every mutation below is a single assignment.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl SharedStore for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let inner = self.lock();
        if let Some(status) = inner.failing_status {
            return Err(StoreError::Host(status));
        }
        Ok(inner.entries.get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(status) = inner.failing_status {
            return Err(StoreError::Host(status));
        }
        let current = inner.entries.get(key).map(|(_, c)| *c);
        if let (Some(current), true) = (current, cas != 0) {
            if inner.injected_conflicts > 0 {
                inner.injected_conflicts -= 1;
                inner.conflicts_seen += 1;
                if let Some(entry) = inner.entries.get_mut(key) {
                    entry.1 = entry.1.wrapping_add(1).max(1);
                }
                return Err(StoreError::CasMismatch);
            }
            if current != cas {
                inner.conflicts_seen += 1;
                return Err(StoreError::CasMismatch);
            }
        }
        let next = current.map_or(1, |c| c.wrapping_add(1).max(1));
        inner.entries.insert(key.to_owned(), (value.to_vec(), next));
        inner.writes += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_envoy_cas_rules() {
        let store = MemoryStore::new();
        assert_eq!(store.get("k").unwrap(), None);
        // Creation ignores the CAS token: the race design.md warns about.
        store.set("k", b"a", 77).unwrap();
        let (value, cas) = store.get("k").unwrap().unwrap();
        assert_eq!(value, b"a");
        assert_eq!(store.set("k", b"b", cas + 1), Err(StoreError::CasMismatch));
        store.set("k", b"b", cas).unwrap();
        assert_eq!(store.set("k", b"c", cas), Err(StoreError::CasMismatch));
        store.set("k", b"d", 0).unwrap();
        assert_eq!(store.get("k").unwrap().unwrap().0, b"d");
    }

    #[test]
    fn injected_conflicts_fail_conditional_writes_only() {
        let store = MemoryStore::new();
        store.set("k", b"a", 0).unwrap();
        store.inject_conflicts(1);
        let (_, cas) = store.get("k").unwrap().unwrap();
        assert_eq!(store.set("k", b"b", cas), Err(StoreError::CasMismatch));
        let (value, cas) = store.get("k").unwrap().unwrap();
        assert_eq!(value, b"a");
        store.set("k", b"b", cas).unwrap();
        assert_eq!(store.conflicts_seen(), 1);
    }

    #[test]
    fn host_failures_surface_as_errors() {
        let store = MemoryStore::new();
        store.fail_with(Some(2));
        assert_eq!(store.get("k"), Err(StoreError::Host(2)));
        assert_eq!(store.set("k", b"", 0), Err(StoreError::Host(2)));
    }
}
