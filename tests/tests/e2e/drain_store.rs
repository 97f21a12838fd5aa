//! The drain's shared decision in DynamoDB (moto's server): one claim per version,
//! only its claimant publishes, a record no build can read is still replaced, a
//! missing table says so, and tasks sharing the table make one decision per interval
//! for the whole service.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use e2e::moto::Moto;
use task_protection::drain::{
    ApiError, Controller, DeploymentFacts, Drain, DrainSettings, DynamoStore, Health, Membership,
    Record, Rollout, ServiceApi, ServiceFacts, ShiftFacts, StoreError, Strategy, TaskFacts,
    TaskInfo, VerdictStore,
};

const TABLE: &str = "drain";

async fn moto_with_table() -> Moto {
    let moto = Moto::start().await;
    e2e::dynamo::create_drain_table(&moto.endpoint(), TABLE).await;
    moto
}

fn store(moto: &Moto) -> DynamoStore {
    DynamoStore::for_endpoint(
        &moto.endpoint(),
        TABLE,
        "arn:aws:ecs:us-east-1:1:cluster/c",
        "web",
    )
}

#[tokio::test]
async fn one_claim_per_version_and_only_its_claimant_publishes() {
    let moto = moto_with_table().await;
    let (a, b) = (store(&moto), store(&moto));
    assert_eq!(a.key(), "c/web");
    assert_eq!(a.read().await, Ok(None));
    assert_eq!(a.claim(0, "task-a", 1_000, 61_000).await, Ok(true));
    assert_eq!(b.claim(0, "task-b", 2_000, 62_000).await, Ok(false));
    let record = Record::first(SystemTime::now());
    assert_eq!(b.publish(0, "task-b", &record).await, Ok(false));
    assert_eq!(a.publish(0, "task-a", &record).await, Ok(true));
    let stored = b.read().await.unwrap().unwrap();
    assert_eq!((stored.version, &stored.claim), (1, &None));
    assert_eq!(stored.record.as_deref(), Ok(&record));
    // A claim on a stale version fails; one on the current version succeeds; an
    // expired claim can be taken over, and its first holder can then not publish.
    assert_eq!(b.claim(0, "task-b", 70_000, 130_000).await, Ok(false));
    assert_eq!(b.claim(1, "task-b", 70_000, 130_000).await, Ok(true));
    assert_eq!(a.claim(1, "task-a", 100_000, 160_000).await, Ok(false));
    assert_eq!(a.claim(1, "task-a", 131_000, 191_000).await, Ok(true));
    assert_eq!(b.publish(1, "task-b", &record).await, Ok(false));
    assert_eq!(a.publish(1, "task-a", &record).await, Ok(true));
}

/// DynamoDB applies a conditional write to an item atomically (its developer guide,
/// "Condition expressions"), so of claims racing in the same millisecond exactly one
/// passes. moto's server checks and writes without a lock, so there two racing claims
/// can both pass: the claims here come one after another, as they would be ordered.
#[tokio::test]
async fn of_many_tasks_claiming_in_turn_exactly_one_wins() {
    let moto = moto_with_table().await;
    let mut won = Vec::new();
    for i in 0..20 {
        if store(&moto)
            .claim(0, &format!("task-{i}"), 1_000 + i, 61_000 + i)
            .await
            == Ok(true)
        {
            won.push(i);
        }
    }
    assert_eq!(won, [0]);
}

#[tokio::test]
async fn a_record_no_build_can_read_is_replaced_by_the_next_decision() {
    let moto = moto_with_table().await;
    let a = store(&moto);
    assert_eq!(a.claim(0, "task-a", 1_000, 2_000).await, Ok(true));
    let mut record = Record::first(SystemTime::now());
    record.schema = 99;
    assert_eq!(a.publish(0, "task-a", &record).await, Ok(true));
    let stored = a.read().await.unwrap().unwrap();
    assert!(stored.record.is_err(), "{stored:?}");
    assert_eq!(a.claim(1, "task-b", 3_000, 4_000).await, Ok(true));
}

#[tokio::test]
async fn a_missing_table_makes_the_store_unusable_and_says_which() {
    let moto = Moto::start().await;
    let err = store(&moto).read().await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Unusable(m) if m.contains("drain")),
        "{err}"
    );
}

/// A steady service of `n` tasks, counting its DescribeServices calls.
#[derive(Debug, Clone)]
struct Steady {
    n: u32,
    describes: Arc<AtomicUsize>,
}

fn arn(i: u32) -> String {
    format!("arn:aws:ecs:us-east-1:1:task/c/{i:032x}")
}

impl ServiceApi for Steady {
    async fn describe_service(&self, _: &str, _: &str) -> Result<ServiceFacts, ApiError> {
        self.describes.fetch_add(1, Ordering::Relaxed);
        Ok(ServiceFacts {
            desired: self.n,
            running: self.n,
            pending: 0,
            daemon: false,
            controller: Controller::Ecs,
            strategy: Strategy::Rolling,
            minimum_healthy_percent: 100,
            maximum_percent: 200,
            grace: Duration::ZERO,
            deployments: vec![DeploymentFacts {
                id: "ecs-svc/1".into(),
                primary: true,
                task_definition: "td:1".into(),
                desired: self.n,
                running: self.n,
                pending: 0,
                failed_tasks: 0,
                rollout: Rollout::Completed,
                created_at: None,
            }],
            current_deployment: None,
            load_balanced: false,
        })
    }

    async fn list_tasks(
        &self,
        _: &str,
        _: &str,
        stopped: bool,
        _: Option<String>,
    ) -> Result<(Vec<String>, Option<String>), ApiError> {
        let arns = if stopped {
            Vec::new()
        } else {
            (0..self.n).map(arn).collect()
        };
        Ok((arns, None))
    }

    async fn describe_tasks(&self, _: &str, arns: &[String]) -> Result<Vec<TaskFacts>, ApiError> {
        Ok(arns
            .iter()
            .map(|a| TaskFacts {
                arn: a.clone(),
                group: Some("service:web".into()),
                deployment: Some("ecs-svc/1".into()),
                task_definition: Some("td:1".into()),
                running: true,
                stopping: false,
                health: Health::Unknown,
                started_at: Some(SystemTime::now() - Duration::from_secs(600)),
                zone: None,
                instance: None,
            })
            .collect())
    }

    async fn draining_instances(
        &self,
        _: &str,
        _: &[String],
    ) -> Result<BTreeSet<String>, ApiError> {
        Ok(BTreeSet::new())
    }

    async fn service_deployment(&self, _: &str) -> Result<ShiftFacts, ApiError> {
        Err(ApiError::Refused("not used".into()))
    }
}

#[tokio::test]
async fn tasks_sharing_the_table_make_one_decision_per_interval_for_the_service() {
    let moto = moto_with_table().await;
    let api = Steady {
        n: 10,
        describes: Arc::default(),
    };
    let settings = DrainSettings::builder()
        .check_interval(Duration::from_secs(1))
        .build()
        .unwrap();
    let drains: Vec<Drain> = (0..10)
        .map(|i| {
            Drain::watch_with(
                api.clone(),
                store(&moto),
                TaskInfo::new("c", arn(i), "web"),
                settings.clone(),
            )
        })
        .collect();
    let start = tokio::time::Instant::now();
    e2e::wait_for("ten decisions", Duration::from_secs(60), || async {
        (api.describes.load(Ordering::Relaxed) >= 10).then_some(())
    })
    .await;
    let took = start.elapsed();
    // One decision a second for the service, whoever makes it: ten decisions take
    // about nine seconds, not one (as ten tasks asking each second would).
    assert!(took >= Duration::from_secs(5), "ten decisions in {took:?}");
    assert!(
        drains
            .iter()
            .all(|d| d.is_on() && d.membership() == Membership::Wanted)
    );
}
