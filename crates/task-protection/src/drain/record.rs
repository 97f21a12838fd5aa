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

/// How many leading characters of a task id the list of wanted tasks keeps: 48 bits,
/// so that two tasks of a service of 5,000 share a prefix with odds of about 1 in
/// 10 million (and then the stopping one is taken for wanted, the safe side).
const ID_PREFIX: usize = 12;

/// How much two tasks' clocks may disagree (Amazon Time Sync keeps them within
/// milliseconds; this allows for much worse).
const CLOCK_MARGIN: Duration = Duration::from_secs(10);

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
pub enum Verdict {
    /// The drain does not apply to this service (its deployments are run by
    /// CodeDeploy or an external controller): every task keeps the older behaviour.
    Off {
        /// Why, in a sentence.
        why: String,
    },
    /// The drain applies.
    On {
        /// The tasks to leave, by task id, and why.
        leaving: BTreeMap<String, LeaveReason>,
        /// The tasks ECS wanted running when they were last listed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listed: Option<Listed>,
    },
}

impl Default for Verdict {
    fn default() -> Self {
        Self::On {
            leaving: BTreeMap::new(),
            listed: None,
        }
    }
}

/// The tasks whose desired status was RUNNING at one listing: a task not among them
/// although it started before is being stopped by ECS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    /// When they were listed.
    pub at: u64,
    /// The first characters of their ids, sorted.
    pub ids: Vec<String>,
}

impl Listed {
    /// The listing of `ids` at `at`.
    #[must_use]
    pub fn new<'a>(at: SystemTime, ids: impl IntoIterator<Item = &'a str>) -> Self {
        let mut ids: Vec<String> = ids.into_iter().map(|id| prefix(id).to_owned()).collect();
        ids.sort_unstable();
        ids.dedup();
        Self {
            at: millis(at),
            ids,
        }
    }

    /// Whether the task with this id was listed.
    #[must_use]
    pub fn contains(&self, id: &str) -> bool {
        self.ids
            .binary_search_by(|p| p.as_str().cmp(prefix(id)))
            .is_ok()
    }
}

fn prefix(id: &str) -> &str {
    let end = id
        .char_indices()
        .nth(ID_PREFIX)
        .map_or(id.len(), |(i, _)| i);
    &id[..end]
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
    /// ([`ServiceFacts::digest`](super::facts::ServiceFacts::digest)).
    #[serde(default)]
    pub listed_digest: Option<String>,
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

    /// What this record says to the task with id `task_id`, whose process started at
    /// `started`: `None` when it says nothing new of that task (the task keeps what it
    /// has). Only an explicit answer changes a task's mind:
    /// - leaving, when the task is among those to leave;
    /// - leaving because ECS is stopping it, when the tasks ECS wanted running were
    ///   listed after the task started and it was not among them;
    /// - wanted, when it was listed and is not among those to leave.
    #[must_use]
    pub fn membership_of(&self, task_id: &str, started: SystemTime) -> Option<Membership> {
        let Verdict::On { leaving, listed } = &self.verdict else {
            return Some(Membership::Wanted);
        };
        if let Some(reason) = leaving.get(task_id) {
            return Some(Membership::Leaving(reason.clone()));
        }
        let listed = listed.as_ref()?;
        if listed.contains(task_id) {
            Some(Membership::Wanted)
        } else if time(listed.at) > started + CLOCK_MARGIN {
            Some(Membership::Leaving(LeaveReason::Stopping))
        } else {
            None
        }
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
    pub fn leaving(&self) -> Option<&BTreeMap<String, LeaveReason>> {
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

    fn record(leaving: &[(&str, LeaveReason)], listed: Option<Listed>) -> Record {
        Record {
            verdict: Verdict::On {
                leaving: leaving
                    .iter()
                    .map(|(id, r)| ((*id).to_owned(), r.clone()))
                    .collect(),
                listed,
            },
            ..Record::first(UNIX_EPOCH)
        }
    }

    #[test]
    fn only_an_explicit_answer_changes_a_task_s_mind() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let listed = Listed::new(t0, ["aaaaaaaaaaaaaaaa1", "bbbbbbbbbbbbbbbb2"]);
        let r = record(
            &[(
                "bbbbbbbbbbbbbbbb2",
                LeaveReason::Surplus {
                    running: 2,
                    desired: 1,
                },
            )],
            Some(listed),
        );
        assert_eq!(
            r.membership_of("aaaaaaaaaaaaaaaa1", t0),
            Some(Membership::Wanted)
        );
        assert!(
            r.membership_of("bbbbbbbbbbbbbbbb2", t0)
                .is_some_and(|m| m.is_leaving())
        );
        // Started long before the listing and not in it: ECS is stopping it.
        assert_eq!(
            r.membership_of("cccccccccccccccc3", t0 - Duration::from_secs(60)),
            Some(Membership::Leaving(LeaveReason::Stopping))
        );
        // Started about when the listing was made: nothing is known of it yet.
        assert_eq!(r.membership_of("cccccccccccccccc3", t0), None);
        // Nothing listed yet: nothing to say of a task not leaving.
        assert_eq!(
            record(&[], None).membership_of("aaaaaaaaaaaaaaaa1", t0),
            None
        );
    }

    #[test]
    fn the_json_form_round_trips_and_refuses_other_schemas() {
        let r = record(
            &[("a", LeaveReason::Stopping)],
            Some(Listed::new(UNIX_EPOCH, ["a", "b"])),
        );
        assert_eq!(Record::from_json(&r.to_json()), Ok(r.clone()));
        let other = r.to_json().replace("\"v\":1", "\"v\":2");
        assert!(Record::from_json(&other).is_err());
        assert!(Record::from_json("{").is_err());
    }

    #[test]
    fn ids_are_compared_by_their_prefix() {
        let listed = Listed::new(UNIX_EPOCH, ["0123456789abcdef0123456789abcdef", "x"]);
        assert!(listed.contains("0123456789abcdef0123456789abcdef"));
        assert!(listed.contains("x"));
        assert!(listed.contains("0123456789abXXXX"));
        assert!(!listed.contains("0123456789acdef"));
        assert_eq!(listed.ids, ["0123456789ab", "x"]);
    }
}
