//! What one decision leaves behind for every task of the service: the verdict (which
//! tasks leave and why, which tasks ECS wants running), what the next decision must
//! remember, and when it is due. It is stored where the service's tasks read it (see
//! [`store`](super::store)), so a record is plain data with a stable JSON form.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{LeaveReason, Membership};

/// The record's JSON form; a reader that meets another keeps its last answer.
pub(super) const SCHEMA: u32 = 1;

/// How many hex digits of a task id's hash the list of stopping tasks keeps: 48
/// bits, so that a task shares one with one of 5,000 others with odds of about 1 in
/// 50 million. A hash, not the id's first characters: ids need not be random.
const ID_DIGITS: usize = 12;

/// How long a task that has left stays in the record once ECS no longer lists it
/// among the tasks it wants running: long past its stop.
pub(super) const FORGET_AFTER: Duration = Duration::from_secs(3_600);

/// Milliseconds since the epoch, the record's unit of time.
#[must_use]
pub(super) fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The time `ms` milliseconds after the epoch.
#[must_use]
pub(super) fn time(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// One decision, and what the next one needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Record {
    /// [`SCHEMA`].
    #[serde(rename = "v")]
    pub schema: u32,
    /// When ECS was last asked successfully.
    pub decided_at: u64,
    /// When the next decision is due.
    pub due_at: u64,
    /// What the tasks are to do.
    pub verdict: Verdict,
    /// What the next decision remembers.
    pub memory: Memory,
    /// How many decisions in a row ECS throttled: the next waits 2^n intervals (at most
    /// 8).
    #[serde(default)]
    pub throttled: u32,
}

/// What the tasks of the service are to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Verdict {
    /// The drain does not apply to this service (its deployments are run by
    /// CodeDeploy or an external controller): every task keeps the older behaviour.
    Off {
        /// Why, in a sentence.
        why: String,
    },
    /// The drain applies: every task not named here is wanted.
    On {
        /// The tasks to leave, by task id. A task stays here until ECS has stopped it
        /// (and [`FORGET_AFTER`] more), or until ECS's own figures want it back.
        leaving: BTreeMap<String, Leave>,
        /// The tasks ECS is stopping or has stopped (`ListTasks` with desired status
        /// STOPPED), by the digest of their id, sorted.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        stopping: Vec<String>,
    },
}

impl Default for Verdict {
    fn default() -> Self {
        Self::On {
            leaving: BTreeMap::new(),
            stopping: Vec::new(),
        }
    }
}

/// One task's leave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Leave {
    /// Why it leaves.
    pub reason: LeaveReason,
    /// When it was told to.
    pub since: u64,
    /// When ECS last listed it among the tasks it wants running.
    pub seen: u64,
}

/// The digests of `ids`, sorted, for the list of stopping tasks.
#[must_use]
pub(super) fn digests<'a>(ids: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut out: Vec<String> = ids.into_iter().map(digest).collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The 64-bit FNV-1a hash of `id`, its first [`ID_DIGITS`] hex digits: stable across
/// builds, so that every task reads the list the same way.
fn digest(id: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in id.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut hex = format!("{hash:016x}");
    hex.truncate(ID_DIGITS);
    hex
}

/// What a decision remembers for the next one.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Memory {
    /// The desired count last seen.
    #[serde(default)]
    pub desired: Option<u32>,
    /// When the desired count last fell: tasks ECS started after it are its own
    /// replacements, not part of a scale-in.
    #[serde(default)]
    pub desired_fell_at: Option<u64>,
    /// The PRIMARY deployment last seen, its `failedTasks`, and since when that count
    /// has not changed.
    #[serde(default)]
    pub primary: Option<PrimaryWatch>,
    /// What the service looked like at the last listing of its tasks
    /// ([`ServiceFacts::digest`](super::facts::ServiceFacts::digest)), and when that
    /// was.
    #[serde(default)]
    pub listed_digest: Option<String>,
    /// When the tasks were last listed.
    #[serde(default)]
    pub listed_at: Option<u64>,
}

/// The PRIMARY deployment's failures, watched over time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrimaryWatch {
    /// Its id.
    pub id: String,
    /// Its `failedTasks`.
    pub failed_tasks: u32,
    /// Since when `failedTasks` has had this value.
    pub since: u64,
}

impl Record {
    /// A first record, due at once.
    #[must_use]
    pub fn first(now: SystemTime) -> Self {
        Self {
            schema: SCHEMA,
            decided_at: 0,
            due_at: millis(now),
            verdict: Verdict::default(),
            memory: Memory::default(),
            throttled: 0,
        }
    }

    /// Whether the next decision is due at `now`.
    #[must_use]
    pub fn due(&self, now: SystemTime) -> bool {
        millis(now) >= self.due_at
    }

    /// What this record says to the task with id `task_id`: leaving when it is named
    /// among those to leave, or among those ECS is stopping; otherwise wanted, once a
    /// decision has been made (`None` before: nothing is known yet).
    #[must_use]
    pub fn membership_of(&self, task_id: &str) -> Option<Membership> {
        let Verdict::On { leaving, stopping } = &self.verdict else {
            return Some(Membership::Wanted);
        };
        if let Some(leave) = leaving.get(task_id) {
            return Some(Membership::Leaving(leave.reason.clone()));
        }
        if stopping.binary_search(&digest(task_id)).is_ok() {
            return Some(Membership::Leaving(LeaveReason::Stopping));
        }
        (self.decided_at > 0).then_some(Membership::Wanted)
    }

    /// Why the drain is off for the service, when it is.
    #[must_use]
    pub fn off(&self) -> Option<&str> {
        match &self.verdict {
            Verdict::Off { why } => Some(why),
            Verdict::On { .. } => None,
        }
    }

    /// The tasks to leave.
    #[must_use]
    pub fn leaving(&self) -> Option<&BTreeMap<String, Leave>> {
        match &self.verdict {
            Verdict::On { leaving, .. } => Some(leaving),
            Verdict::Off { .. } => None,
        }
    }

    /// The JSON form.
    ///
    /// # Panics
    /// Never: every field serializes.
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| unreachable!("a record serializes: {e}"))
    }

    /// From the JSON form.
    ///
    /// # Errors
    /// When `text` is not a record of this [`SCHEMA`].
    pub fn from_json(text: &str) -> Result<Self, String> {
        let record: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if record.schema == SCHEMA {
            Ok(record)
        } else {
            Err(format!(
                "a record of schema {}, this build reads {SCHEMA}",
                record.schema
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(leaving: &[(&str, LeaveReason)], stopping: &[&str]) -> Record {
        Record {
            decided_at: 1,
            verdict: Verdict::On {
                leaving: leaving
                    .iter()
                    .map(|(id, r)| {
                        (
                            (*id).to_owned(),
                            Leave {
                                reason: r.clone(),
                                since: 0,
                                seen: 0,
                            },
                        )
                    })
                    .collect(),
                stopping: digests(stopping.iter().copied()),
            },
            ..Record::first(UNIX_EPOCH)
        }
    }

    #[test]
    fn a_task_is_leaving_when_named_and_wanted_otherwise() {
        let surplus = LeaveReason::Surplus {
            running: 2,
            desired: 1,
        };
        let r = record(&[("b", surplus.clone())], &["c"]);
        assert_eq!(r.membership_of("a"), Some(Membership::Wanted));
        assert_eq!(r.membership_of("b"), Some(Membership::Leaving(surplus)));
        assert_eq!(
            r.membership_of("c"),
            Some(Membership::Leaving(LeaveReason::Stopping))
        );
        // Before any decision, nothing is known.
        assert_eq!(Record::first(UNIX_EPOCH).membership_of("a"), None);
        // Off: wanted.
        let off = Record {
            verdict: Verdict::Off { why: "x".into() },
            ..Record::first(UNIX_EPOCH)
        };
        assert_eq!(off.membership_of("a"), Some(Membership::Wanted));
    }

    #[test]
    fn the_json_form_round_trips_and_refuses_other_schemas() {
        let r = record(&[("a", LeaveReason::Stopping)], &["b"]);
        assert_eq!(Record::from_json(&r.to_json()), Ok(r.clone()));
        let other = r.to_json().replace("\"v\":1", "\"v\":2");
        assert!(Record::from_json(&other).is_err());
        assert!(Record::from_json("{").is_err());
    }

    #[test]
    fn ids_are_compared_by_a_stable_hash_not_their_first_characters() {
        let r = record(&[], &["000000000000000000000000a0000001", "x"]);
        assert!(
            r.membership_of("000000000000000000000000a0000001")
                .is_some_and(|m| m.is_leaving())
        );
        // Ids that share their first characters are told apart.
        assert_eq!(
            r.membership_of("000000000000000000000000a0000002"),
            Some(Membership::Wanted)
        );
        // The same digest in every build: FNV-1a of "x".
        assert_eq!(digests(["x"]), ["af63f54c8602"]);
    }
}
