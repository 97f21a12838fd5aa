//! The drain watcher on paused time, against a scripted ECS service: what it decides,
//! how often it asks, alone and sharing one decision, and what it does when ECS cannot
//! answer.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use task_protection::drain::{
    ApiError, Controller, DeploymentFacts, Drain, DrainSettings, Health, LeaveReason, LocalStore,
    Membership, Rollout, ServiceApi, ServiceFacts, ShiftFacts, Strategy, TaskFacts, TaskInfo,
};
use tokio::time::advance;

#[derive(Debug)]
struct State {
    service: ServiceFacts,
    tasks: Vec<TaskFacts>,
    fault: Option<ApiError>,
    /// Answers take this long.
    delay: Duration,
    calls: Vec<&'static str>,
    /// When each call came.
    at: Vec<tokio::time::Instant>,
}

#[derive(Debug, Clone)]
struct Scripted(Arc<Mutex<State>>);

impl Scripted {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn calls(&self, op: &str) -> usize {
        self.state().calls.iter().filter(|c| **c == op).count()
    }

    fn all_calls(&self) -> usize {
        self.state().calls.len()
    }

    async fn answer<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&State) -> T,
    ) -> Result<T, ApiError> {
        let delay = {
            let mut s = self.state();
            s.calls.push(op);
            s.at.push(tokio::time::Instant::now());
            s.delay
        };
        tokio::time::sleep(delay).await;
        let s = self.state();
        match &s.fault {
            Some(e) => Err(e.clone()),
            None => Ok(f(&s)),
        }
    }

    /// Sets the desired count; running follows the tasks listed.
    fn desire(&self, desired: u32) {
        let mut s = self.state();
        s.service.desired = desired;
        s.service.deployments[0].desired = desired;
    }

    /// Adds a task; the service's running count follows.
    fn add(&self, task: TaskFacts) {
        let mut s = self.state();
        s.tasks.push(task);
        s.service.running = u32::try_from(s.tasks.len()).unwrap();
    }
}

impl ServiceApi for Scripted {
    async fn describe_service(&self, _: &str, _: &str) -> Result<ServiceFacts, ApiError> {
        self.answer("DescribeServices", |s| s.service.clone()).await
    }

    async fn list_tasks(
        &self,
        _: &str,
        _: &str,
        stopped: bool,
        next: Option<String>,
    ) -> Result<(Vec<String>, Option<String>), ApiError> {
        let start: usize = next.map_or(0, |n| n.parse().unwrap());
        self.answer("ListTasks", |s| {
            let arns: Vec<String> = s
                .tasks
                .iter()
                .filter(|t| t.stopping == stopped)
                .map(|t| t.arn.clone())
                .collect();
            let page = arns.iter().skip(start).take(100).cloned().collect();
            let next = (start + 100 < arns.len()).then(|| (start + 100).to_string());
            (page, next)
        })
        .await
    }

    async fn describe_tasks(&self, _: &str, arns: &[String]) -> Result<Vec<TaskFacts>, ApiError> {
        self.answer("DescribeTasks", |s| {
            s.tasks
                .iter()
                .filter(|t| arns.contains(&t.arn))
                .cloned()
                .collect()
        })
        .await
    }

    async fn draining_instances(
        &self,
        _: &str,
        _: &[String],
    ) -> Result<BTreeSet<String>, ApiError> {
        self.answer("DescribeContainerInstances", |_| BTreeSet::new())
            .await
    }

    async fn service_deployment(&self, _: &str) -> Result<ShiftFacts, ApiError> {
        self.answer("DescribeServiceDeployments", |_| ShiftFacts {
            status: "IN_PROGRESS".into(),
            stage: Some("BAKE_TIME".into()),
        })
        .await
    }
}

fn arn(id: &str) -> String {
    format!("arn:aws:ecs:us-east-1:123456789012:task/c/{id}")
}

/// A task of `deployment` that started `ago` before the test's first instant.
fn task(id: &str, deployment: &str, ago: u64) -> TaskFacts {
    TaskFacts {
        arn: arn(id),
        group: Some("service:web".into()),
        deployment: Some(deployment.into()),
        task_definition: Some(format!("td:{deployment}")),
        running: true,
        stopping: false,
        health: Health::Unknown,
        started_at: Some(SystemTime::now() - Duration::from_secs(ago)),
        zone: Some("z1".into()),
        instance: None,
    }
}

fn deployment(id: &str, primary: bool, desired: u32) -> DeploymentFacts {
    DeploymentFacts {
        id: id.into(),
        primary,
        task_definition: format!("td:{id}"),
        desired,
        running: desired,
        pending: 0,
        failed_tasks: 0,
        rollout: if primary {
            Rollout::Completed
        } else {
            Rollout::InProgress
        },
        created_at: Some(SystemTime::now()),
    }
}

/// A service of `n` tasks of one deployment, all wanted, started 1,000 s ago and more.
fn steady(n: u32) -> Scripted {
    let tasks: Vec<TaskFacts> = (0..n)
        .map(|i| task(&format!("t{i:03}"), "d1", 2_000 - u64::from(i)))
        .collect();
    Scripted(Arc::new(Mutex::new(State {
        service: ServiceFacts {
            desired: n,
            running: n,
            pending: 0,
            daemon: false,
            controller: Controller::Ecs,
            strategy: Strategy::Rolling,
            minimum_healthy_percent: 100,
            maximum_percent: 200,
            grace: Duration::ZERO,
            deployments: vec![deployment("d1", true, n)],
            current_deployment: None,
            load_balanced: false,
        },
        tasks,
        fault: None,
        delay: Duration::ZERO,
        calls: Vec::new(),
        at: Vec::new(),
    })))
}

const INTERVAL: Duration = Duration::from_secs(30);

fn settings() -> DrainSettings {
    DrainSettings::builder()
        .check_interval(INTERVAL)
        .build()
        .unwrap()
}

fn me(id: &str) -> TaskInfo {
    TaskInfo::new("c", arn(id), "web")
}

/// Lets `d` pass in one-second steps, so timers fire on time.
async fn pass(d: Duration) {
    let mut left = d;
    while !left.is_zero() {
        let step = left.min(Duration::from_secs(1));
        advance(step).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        left -= step;
    }
}

fn leaving(drains: &[Drain]) -> Vec<bool> {
    drains.iter().map(|d| d.membership().is_leaving()).collect()
}

#[tokio::test(start_paused = true)]
async fn scale_in_makes_exactly_the_surplus_leave_and_a_rise_brings_it_back() {
    let api = steady(3);
    let drains: Vec<Drain> = ["t000", "t001", "t002"]
        .iter()
        .map(|id| Drain::watch(api.clone(), me(id), settings()))
        .collect();
    pass(INTERVAL * 2).await;
    assert_eq!(leaving(&drains), [false, false, false]);
    api.desire(1);
    pass(INTERVAL * 3).await;
    // t000 and t001 started first: they go.
    assert_eq!(leaving(&drains), [true, true, false]);
    assert_eq!(
        drains[0].membership(),
        Membership::Leaving(LeaveReason::Surplus {
            running: 3,
            desired: 1
        })
    );
    // The desired count rises before ECS stopped them: wanted again.
    api.desire(3);
    pass(INTERVAL * 3).await;
    assert_eq!(leaving(&drains), [false, false, false]);
}

#[tokio::test(start_paused = true)]
async fn tasks_sharing_a_store_make_one_decision_per_interval_for_the_service() {
    let api = steady(40);
    let store = LocalStore::common();
    let drains: Vec<Drain> = (0..40)
        .map(|i| {
            Drain::watch_with(
                api.clone(),
                store.clone(),
                me(&format!("t{i:03}")),
                settings(),
            )
        })
        .collect();
    pass(Duration::from_secs(600)).await;
    // Twenty intervals: twenty decisions for the service, not twenty per task.
    let decisions = api.calls("DescribeServices");
    assert!((18..=22).contains(&decisions), "{decisions}");
    api.desire(30);
    pass(INTERVAL * 3).await;
    let gone: usize = leaving(&drains).iter().filter(|l| **l).count();
    assert_eq!(gone, 10);
    // The ten oldest.
    assert_eq!(leaving(&drains)[..10], [true; 10]);
}

#[tokio::test(start_paused = true)]
async fn a_task_alone_asks_about_twice_a_minute_and_lists_only_when_something_moves() {
    let api = steady(3);
    let drain = Drain::watch(api.clone(), me("t000"), settings());
    pass(Duration::from_secs(1_200)).await;
    let checks = api.calls("DescribeServices");
    // Twenty minutes at one check per 30 s on average, jittered.
    assert!((30..=50).contains(&checks), "{checks} checks in 20 minutes");
    // Listed at first, then again only when the listing is ten intervals old (each
    // listing: a page of the running tasks, a page of the stopped ones).
    let lists = api.calls("ListTasks") / 2;
    assert!((1..=5).contains(&lists), "{lists} lists in 20 minutes");
    api.desire(2);
    pass(INTERVAL * 3).await;
    assert!(drain.membership().is_leaving());
}

#[tokio::test(start_paused = true)]
async fn tasks_that_start_together_do_not_ask_together() {
    let api = steady(20);
    let _drains: Vec<Drain> = (0..20)
        .map(|i| Drain::watch(api.clone(), me(&format!("t{i:03}")), settings()))
        .collect();
    // In any one second, only a few of the twenty ask: about 0.7 a second on average,
    // and 9 or more in one of 240 seconds by chance about once in 100,000 runs; all
    // twenty at once is what this guards against.
    let mut most = 0;
    for _ in 0..240 {
        let before = api.calls("DescribeServices");
        pass(Duration::from_secs(1)).await;
        most = most.max(api.calls("DescribeServices") - before);
    }
    assert!(most <= 8, "{most} of 20 tasks asked in the same second");
}

#[tokio::test(start_paused = true)]
async fn access_denied_turns_the_drain_off_and_is_on_says_so() {
    let api = steady(2);
    api.state().fault = Some(ApiError::Denied("not authorized".to_owned()));
    let drain = Drain::watch(api.clone(), me("t000"), settings());
    assert!(drain.is_on());
    pass(INTERVAL * 10).await;
    assert_eq!(api.all_calls(), 1, "one call, then off");
    assert_eq!(drain.membership(), Membership::Wanted);
    assert!(!drain.is_on(), "the older behaviour holds");
}

#[tokio::test(start_paused = true)]
async fn a_service_whose_deployments_are_code_deploy_s_turns_the_drain_off() {
    let api = steady(2);
    api.state().service.controller = Controller::CodeDeploy;
    let drain = Drain::watch(api.clone(), me("t000"), settings());
    let mut on = drain.on_changes();
    tokio::time::timeout(INTERVAL * 2, on.wait_for(|on| !on))
        .await
        .expect("off within two intervals")
        .unwrap();
    let calls = api.all_calls();
    pass(INTERVAL * 10).await;
    assert_eq!(api.all_calls(), calls, "no more calls");
}

#[tokio::test(start_paused = true)]
async fn throttling_backs_off_and_keeps_the_verdict() {
    let api = steady(3);
    api.desire(2);
    let drain = Drain::watch(api.clone(), me("t000"), settings());
    pass(INTERVAL * 3).await;
    assert!(drain.membership().is_leaving());
    api.state().fault = Some(ApiError::Throttled("Rate exceeded".to_owned()));
    let before = api.all_calls();
    let mut flips = drain.subscribe();
    flips.borrow_and_update();
    pass(Duration::from_secs(1_200)).await;
    let calls = api.all_calls() - before;
    // Doubling up to 8 intervals: far fewer than the 40 of a healthy 20 minutes.
    assert!(calls <= 12, "{calls} calls in 20 minutes while throttled");
    assert!(!flips.has_changed().unwrap(), "the verdict held");
    assert!(drain.membership().is_leaving());
    api.state().fault = None;
    let before = api.all_calls();
    // The wait under way ends (at most 8 intervals, jittered), then every 30 s again.
    pass(Duration::from_secs(1_200)).await;
    assert!(api.all_calls() - before >= 20, "back to the interval");
}

#[tokio::test(start_paused = true)]
async fn doubt_never_changes_a_task_s_mind() {
    for fault in [
        ApiError::Unavailable("no answer".to_owned()),
        ApiError::Malformed("not a list".to_owned()),
    ] {
        let api = steady(3);
        let drain = Drain::watch(api.clone(), me("t000"), settings());
        pass(INTERVAL * 2).await;
        // ECS wants fewer tasks, but no answer says so.
        api.desire(1);
        api.state().fault = Some(fault.clone());
        pass(INTERVAL * 4).await;
        assert_eq!(drain.membership(), Membership::Wanted, "{fault}");
        api.state().fault = None;
        pass(INTERVAL * 3).await;
        assert!(drain.membership().is_leaving(), "{fault}");
        // Leaving, ECS stops answering: the task stays gone (no flapping), for hours.
        api.state().delay = Duration::from_secs(3_600);
        pass(Duration::from_secs(4 * 3_600)).await;
        assert!(drain.membership().is_leaving(), "{fault}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_task_ecs_stops_learns_it_and_nothing_brings_it_back() {
    let api = steady(2);
    let drain = Drain::watch(api.clone(), me("t001"), settings());
    pass(INTERVAL * 2).await;
    assert_eq!(drain.membership(), Membership::Wanted);
    // StopTask: ECS wants it stopped (and starts a replacement).
    api.state().tasks[1].stopping = true;
    api.add(task("t999", "d1", 0));
    pass(INTERVAL * 3).await;
    assert_eq!(
        drain.membership(),
        Membership::Leaving(LeaveReason::Stopping)
    );
    // Even were it listed again.
    api.state().tasks[1].stopping = false;
    pass(INTERVAL * 3).await;
    assert_eq!(
        drain.membership(),
        Membership::Leaving(LeaveReason::Stopping)
    );
}

#[tokio::test(start_paused = true)]
async fn an_old_deployment_leaves_once_the_new_tasks_are_ready() {
    let api = steady(2);
    {
        let mut s = api.state();
        s.service.deployments[0].primary = false;
        s.service.deployments.insert(0, deployment("d2", true, 2));
        s.service.deployments[0].rollout = Rollout::InProgress;
    }
    // The new tasks have just started.
    api.add(task("n1", "d2", 0));
    api.add(task("n2", "d2", 0));
    let settle = DrainSettings::builder()
        .check_interval(INTERVAL)
        .settle(Duration::from_secs(120))
        .build()
        .unwrap();
    let old = Drain::watch(api.clone(), me("t000"), settle);
    pass(INTERVAL * 3).await;
    assert_eq!(old.membership(), Membership::Wanted, "not ready yet");
    // Settled: 120 s past the grace period, and a decision after that.
    pass(INTERVAL * 3).await;
    assert_eq!(
        old.membership(),
        Membership::Leaving(LeaveReason::Replaced {
            deployment: "d1".into(),
            primary: "d2".into()
        })
    );
}

#[tokio::test(start_paused = true)]
async fn a_task_deciding_for_itself_does_not_list_a_large_service() {
    let api = steady(60);
    let drain = Drain::watch(api.clone(), me("t000"), settings());
    api.desire(50);
    pass(Duration::from_secs(1_800)).await;
    assert_eq!(api.calls("ListTasks"), 0);
    assert_eq!(drain.membership(), Membership::Wanted);
    // And it asks less often: one check per 30 s per ten tasks.
    let checks = api.calls("DescribeServices");
    assert!(checks <= 15, "{checks}");
}

#[tokio::test(start_paused = true)]
async fn off_is_always_wanted() {
    let drain = Drain::off();
    assert!(!drain.is_on());
    let mut rx = drain.subscribe();
    pass(INTERVAL).await;
    assert_eq!(*rx.borrow_and_update(), Membership::Wanted);
    assert!(
        tokio::time::timeout(Duration::from_secs(60), rx.changed())
            .await
            .is_err(),
        "an idle channel waits"
    );
}

#[tokio::test(start_paused = true)]
async fn a_listing_goes_a_page_at_a_time_and_paced() {
    let api = steady(250);
    let store = LocalStore::common();
    let _drain = Drain::watch_with(api.clone(), store, me("t000"), settings());
    pass(INTERVAL * 2).await;
    // 250 tasks: three pages of ListTasks, three DescribeTasks, and one page of the
    // stopped ones.
    assert_eq!(api.calls("ListTasks"), 4);
    assert_eq!(api.calls("DescribeTasks"), 3);
    // Never two of its calls within 250 ms: a listing of 5,000 tasks does not empty
    // the account's bucket.
    let s = api.state();
    let listing: Vec<_> = s
        .calls
        .iter()
        .zip(&s.at)
        .filter(|(op, _)| matches!(**op, "ListTasks" | "DescribeTasks"))
        .map(|(_, at)| *at)
        .collect();
    assert!(
        listing
            .windows(2)
            .all(|w| w[1] - w[0] >= Duration::from_millis(250)),
        "{listing:?}"
    );
}
