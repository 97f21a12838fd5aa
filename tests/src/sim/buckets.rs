//! The account's ECS API throttling: one token bucket per group of actions, shared by
//! every caller of the account and Region (the tasks, and the other callers a test
//! configures), at the sizes of the ECS API reference's "Request throttling" page.
//! A call takes a token from its group's bucket or is refused with
//! `ThrottlingException` (HTTP 400, `Rate exceeded`). Buckets refill continuously at
//! their rate up to their capacity (the page says "a set number of tokens is added
//! back every second"; spreading that over the second changes nothing on average).

use std::collections::BTreeMap;
use std::time::Duration;

use super::settings::OtherCaller;

/// One group of actions sharing a bucket: its name, its actions, its capacity (the
/// burst) and its refill rate a second (the sustained rate). From the ECS API
/// reference, "Request throttling for the Amazon ECS API", all Regions.
pub const GROUPS: &[(&str, &[&str], f64, f64)] = &[
    (
        "Cluster read actions",
        &["DescribeClusters", "ListClusters"],
        50.0,
        20.0,
    ),
    (
        "Cluster resource modify actions",
        &[
            "DeleteAttributes",
            "DeregisterContainerInstance",
            "ExecuteCommand",
            "PutAttributes",
            "RunTask",
            "StartTask",
            "StopTask",
            "UpdateContainerAgent",
            "UpdateContainerInstancesState",
        ],
        100.0,
        40.0,
    ),
    (
        "Cluster resource read actions",
        &[
            "DescribeContainerInstances",
            "DescribeTasks",
            "ListAttributes",
            "ListContainerInstances",
            "ListTasks",
        ],
        100.0,
        20.0,
    ),
    (
        "Service modify actions",
        &["CreateService", "DeleteService", "UpdateService"],
        50.0,
        5.0,
    ),
    (
        "Service read actions",
        &["DescribeServices", "ListServices"],
        100.0,
        20.0,
    ),
    (
        "Service deployment actions",
        &["DescribeServiceDeployments", "ListServiceDeployments"],
        50.0,
        20.0,
    ),
    (
        "Service revision actions",
        &["DescribeServiceRevisions"],
        50.0,
        20.0,
    ),
    (
        "Task protection actions",
        &["UpdateTaskProtection", "GetTaskProtection"],
        200.0,
        80.0,
    ),
    (
        "Task definition read actions",
        &[
            "DescribeTaskDefinition",
            "ListTaskDefinitions",
            "ListTaskDefinitionFamilies",
        ],
        50.0,
        20.0,
    ),
];

/// The group an operation belongs to.
#[must_use]
pub fn group_of(operation: &str) -> Option<&'static str> {
    GROUPS
        .iter()
        .find(|(_, ops, _, _)| ops.contains(&operation))
        .map(|(name, _, _, _)| *name)
}

/// One bucket's state and counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    /// Tokens now (as of `at`).
    pub tokens: f64,
    /// Its capacity.
    pub capacity: f64,
    /// Tokens a second.
    pub refill: f64,
    /// When `tokens` was last brought up to date.
    pub at: Duration,
    /// Calls that took a token.
    pub taken: u64,
    /// Calls refused.
    pub throttled: u64,
}

impl Bucket {
    fn refill(&mut self, now: Duration) {
        if now > self.at {
            let more = (now - self.at).as_secs_f64() * self.refill;
            self.tokens = (self.tokens + more).min(self.capacity);
            self.at = now;
        }
    }

    /// Takes a token at `now`; `false` when there is none.
    pub fn take(&mut self, now: Duration) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.taken += 1;
            true
        } else {
            self.throttled += 1;
            false
        }
    }
}

/// An other caller's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtherCounts {
    /// Calls made.
    pub calls: u64,
    /// Calls throttled.
    pub throttled: u64,
}

/// Every bucket of the account, and the other callers.
#[derive(Debug, Clone)]
pub struct Buckets {
    /// Whether calls take tokens.
    pub on: bool,
    /// By group name.
    pub buckets: BTreeMap<&'static str, Bucket>,
    /// The other callers.
    pub others: Vec<OtherCaller>,
    /// Their counts, by name.
    pub other_counts: BTreeMap<String, OtherCounts>,
    /// Calls each other caller owes: the fraction of a call its rate has accrued, and
    /// when its last burst was.
    owed: Vec<(f64, Duration)>,
    /// When the other callers last called.
    others_at: Duration,
}

impl Buckets {
    /// Full buckets at time zero.
    #[must_use]
    pub fn new(on: bool, others: Vec<OtherCaller>) -> Self {
        let buckets = GROUPS
            .iter()
            .map(|(name, _, capacity, refill)| {
                (
                    *name,
                    Bucket {
                        tokens: *capacity,
                        capacity: *capacity,
                        refill: *refill,
                        at: Duration::ZERO,
                        taken: 0,
                        throttled: 0,
                    },
                )
            })
            .collect();
        let owed = others.iter().map(|_| (0.0, Duration::ZERO)).collect();
        let other_counts = others
            .iter()
            .map(|o| (o.name.clone(), OtherCounts::default()))
            .collect();
        Self {
            on,
            buckets,
            others,
            other_counts,
            owed,
            others_at: Duration::ZERO,
        }
    }

    /// Takes a token for `operation` at `now`; `false` when throttled. Operations in no
    /// group are not throttled.
    pub fn take(&mut self, operation: &str, now: Duration) -> bool {
        if !self.on {
            return true;
        }
        let Some(group) = group_of(operation) else {
            return true;
        };
        self.buckets.get_mut(group).is_none_or(|b| b.take(now))
    }

    /// The other callers make the calls they owe since they last called.
    pub fn call_others(&mut self, now: Duration) {
        if now <= self.others_at {
            return;
        }
        let elapsed = (now - self.others_at).as_secs_f64();
        self.others_at = now;
        for i in 0..self.others.len() {
            let other = self.others[i].clone();
            let (owed, last_burst) = self.owed[i];
            let mut owed = owed + other.rate * elapsed;
            let mut calls = 0u64;
            while owed >= 1.0 {
                owed -= 1.0;
                calls += 1;
            }
            let mut burst_at = last_burst;
            if let Some((every, size)) = other.burst
                && !every.is_zero()
                && now >= last_burst + every
            {
                calls += u64::from(size);
                burst_at = now;
            }
            self.owed[i] = (owed, burst_at);
            for _ in 0..calls {
                let ok = self.take(&other.operation, now);
                let counts = self.other_counts.entry(other.name.clone()).or_default();
                counts.calls += 1;
                if !ok {
                    counts.throttled += 1;
                }
            }
        }
    }

    /// The bucket of `group`.
    #[must_use]
    pub fn bucket(&self, group: &str) -> Option<&Bucket> {
        self.buckets.get(group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn the_reads_the_drain_makes_have_the_documented_buckets() {
        for (op, group, capacity, refill) in [
            ("DescribeServices", "Service read actions", 100.0, 20.0),
            ("ListTasks", "Cluster resource read actions", 100.0, 20.0),
            (
                "DescribeTasks",
                "Cluster resource read actions",
                100.0,
                20.0,
            ),
            (
                "DescribeContainerInstances",
                "Cluster resource read actions",
                100.0,
                20.0,
            ),
            (
                "ListServiceDeployments",
                "Service deployment actions",
                50.0,
                20.0,
            ),
            (
                "UpdateTaskProtection",
                "Task protection actions",
                200.0,
                80.0,
            ),
        ] {
            assert_eq!(group_of(op), Some(group), "{op}");
            let b = Buckets::new(true, Vec::new());
            let bucket = b.bucket(group).unwrap();
            assert_eq!((bucket.capacity, bucket.refill), (capacity, refill), "{op}");
        }
    }

    #[test]
    fn a_burst_empties_the_bucket_which_then_refills_at_its_rate() {
        let mut b = Buckets::new(true, Vec::new());
        let t = Duration::from_secs(10);
        let ok = (0..150).filter(|_| b.take("ListTasks", t)).count();
        assert_eq!(ok, 100);
        // DescribeTasks shares the bucket.
        assert!(!b.take("DescribeTasks", t));
        // Half a second later: 10 tokens.
        let ok = (0..20)
            .filter(|_| b.take("DescribeTasks", t + SEC / 2))
            .count();
        assert_eq!(ok, 10);
        // Another group is untouched.
        assert!(b.take("DescribeServices", t));
        let bucket = b.bucket("Cluster resource read actions").unwrap();
        assert_eq!((bucket.taken, bucket.throttled), (110, 61));
    }

    #[test]
    fn other_callers_call_at_their_rate_and_bursts_and_are_throttled_too() {
        let others = vec![
            OtherCaller {
                name: "pipeline".into(),
                operation: "DescribeServices".into(),
                rate: 10.0,
                burst: None,
            },
            OtherCaller {
                name: "console".into(),
                operation: "DescribeServices".into(),
                rate: 0.0,
                burst: Some((Duration::from_secs(10), 150)),
            },
        ];
        let mut b = Buckets::new(true, others);
        for tick in 1..=100u32 {
            b.call_others(SEC * tick / 10);
        }
        // Ten seconds: 100 calls of the pipeline, under the refill, so the bucket
        // stays full; then one burst of 150 against the 99 tokens left.
        let pipeline = &b.other_counts["pipeline"];
        let console = &b.other_counts["console"];
        assert_eq!((pipeline.calls, pipeline.throttled), (100, 0));
        assert_eq!((console.calls, console.throttled), (150, 51));
    }

    #[test]
    fn off_means_never_throttled() {
        let mut b = Buckets::new(false, Vec::new());
        assert!((0..1000).all(|_| b.take("ListTasks", Duration::ZERO)));
    }
}
