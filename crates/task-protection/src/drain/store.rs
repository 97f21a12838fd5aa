//! Where a service's decision lives, so that one decision serves every task.
//!
//! A [`VerdictStore`] holds one [`Record`] per service with a version, and a claim on
//! the next decision: a task that reads a record whose next decision is due claims it
//! (only one claim on a version succeeds), asks ECS, and publishes the next version
//! (only its claimant can). Every other task only reads. So the ECS calls of a service
//! do not grow with its number of tasks: one decision per interval, whoever makes it.
//!
//! - [`LocalStore`]: in this process only; each task decides for itself. Fine for small
//!   services; the ECS calls then grow with the number of tasks.
//! - [`DynamoStore`](super::DynamoStore): a DynamoDB table shared by the service's
//!   tasks, read with eventually consistent `GetItem`s and written with conditional
//!   `UpdateItem`/`PutItem`s.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use super::record::Record;

/// A record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Its version: 0 before the first record, then one more per decision.
    pub version: u64,
    /// The record, or why it cannot be read (written by a newer or older build).
    /// Shared, so that reading it costs no copy.
    pub record: Result<Arc<Record>, String>,
    /// Who claimed the next decision, and until when (milliseconds since the epoch).
    pub claim: Option<(String, u64)>,
}

impl Stored {
    /// Whether a claim at `now` (ms) would find nobody else's claim in the way.
    #[must_use]
    pub fn claim_free(&self, now: u64) -> bool {
        self.claim.as_ref().is_none_or(|(_, until)| *until < now)
    }
}

/// Why the store did not answer usefully.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot be reached, is slow, or throttles: try again later.
    Unavailable(String),
    /// The task role may not use the store, or the table does not exist: the drain
    /// cannot work.
    Unusable(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unavailable(m) => write!(f, "unavailable: {m}"),
            Self::Unusable(m) => write!(f, "unusable: {m}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// Where a service's decision is kept (see the module docs).
pub trait VerdictStore: Send + Sync + 'static {
    /// Whether other tasks of the service share this store, so that one decision
    /// serves them all.
    fn shared(&self) -> bool;

    /// The record and its version; `None` before the first decision.
    fn read(&self) -> impl Future<Output = Result<Option<Stored>, StoreError>> + Send;

    /// Claims the next decision for `owner` until `until` (ms): only while the record
    /// is still at `version` and no other claim holds at `now` (ms). `Ok(false)` when
    /// someone else got there first.
    fn claim(
        &self,
        version: u64,
        owner: &str,
        now: u64,
        until: u64,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Writes `record` as version `version + 1`, only while `owner` holds the claim on
    /// `version`; `Ok(false)` when the claim was lost.
    fn publish(
        &self,
        version: u64,
        owner: &str,
        record: &Record,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
}

/// A store in this process.
///
/// [`LocalStore::new`] is one task's own: the task decides for itself.
/// [`LocalStore::common`] is shared by every watcher given a clone of it, as a table
/// would be by the tasks of a service: for tests and simulations of many tasks in one
/// process.
#[derive(Debug, Clone, Default)]
pub struct LocalStore {
    slot: Arc<Mutex<Option<Stored>>>,
    shared: bool,
}

impl LocalStore {
    /// An empty store for one task.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty store whose clones share one record among several watchers.
    #[must_use]
    pub fn common() -> Self {
        Self {
            slot: Arc::default(),
            shared: true,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Stored>> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl VerdictStore for LocalStore {
    fn shared(&self) -> bool {
        self.shared
    }

    async fn read(&self) -> Result<Option<Stored>, StoreError> {
        Ok(self.lock().clone())
    }

    async fn claim(
        &self,
        version: u64,
        owner: &str,
        now: u64,
        until: u64,
    ) -> Result<bool, StoreError> {
        let mut slot = self.lock();
        let stored = slot.get_or_insert_with(|| Stored {
            version: 0,
            record: Err("no record yet".to_owned()),
            claim: None,
        });
        if stored.version != version || !stored.claim_free(now) {
            return Ok(false);
        }
        stored.claim = Some((owner.to_owned(), until));
        Ok(true)
    }

    async fn publish(
        &self,
        version: u64,
        owner: &str,
        record: &Record,
    ) -> Result<bool, StoreError> {
        let mut slot = self.lock();
        let held = slot.as_ref().is_some_and(|s| {
            s.version == version && s.claim.as_ref().is_some_and(|(o, _)| o == owner)
        });
        if held {
            *slot = Some(Stored {
                version: version + 1,
                record: Ok(Arc::new(record.clone())),
                claim: None,
            });
        }
        Ok(held)
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[tokio::test]
    async fn one_claim_per_version_and_only_its_claimant_publishes() {
        let store = LocalStore::new();
        assert_eq!(store.read().await, Ok(None));
        assert_eq!(store.claim(0, "a", 10, 100).await, Ok(true));
        // b cannot claim while a's claim holds, and cannot publish without one.
        assert_eq!(store.claim(0, "b", 50, 150).await, Ok(false));
        let record = Record::first(UNIX_EPOCH);
        assert_eq!(store.publish(0, "b", &record).await, Ok(false));
        assert_eq!(store.publish(0, "a", &record).await, Ok(true));
        let stored = store.read().await.unwrap().unwrap();
        assert_eq!((stored.version, stored.claim), (1, None));
        // A stale version is refused; an expired claim can be taken over.
        assert_eq!(store.claim(0, "b", 200, 300).await, Ok(false));
        assert_eq!(store.claim(1, "b", 200, 300).await, Ok(true));
        assert_eq!(store.claim(1, "c", 301, 400).await, Ok(true));
        assert_eq!(store.publish(1, "b", &record).await, Ok(false));
    }
}
