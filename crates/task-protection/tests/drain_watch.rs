//! The drain watcher on paused time, against a scripted ECS service: what it decides,
//! how often it asks, and what it does when ECS cannot answer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use task_protection::drain::{
    ApiError, DeploymentView, Drain, DrainSettings, LeaveReason, Membership, ServiceApi,
    ServiceView, TaskInfo, TaskView,
};
use tokio::time::advance;

#[derive(Debug, Default)]
struct State {
    service: Option<ServiceView>,
    tasks: Vec<TaskView>,
    fault: Option<ApiError>,
    /// Answers take this long.
    delay: Duration,
    calls: Vec<&'static str>,
}

#[derive(Debug, Clone, Default)]
struct Scripted(Arc<Mutex<State>>);

impl Scripted {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }

    fn calls(&self, op: &str) -> usize {
        self.state().calls.iter().filter(|c| **c == op).count()
    }

    async fn answer<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&State) -> T,
    ) -> Result<T, ApiError> {
        let delay = {
            let mut s = self.state();
            s.calls.push(op);
            s.delay
        };
        tokio::time::sleep(delay).await;
        let s = self.state();
        match &s.fault {
            Some(e) => Err(e.clone()),
            None => Ok(f(&s)),
        }
    }
}

impl ServiceApi for Scripted {
    async fn describe_tasks(&self, _: &str, arns: &[String]) -> Result<Vec<TaskView>, ApiError> {
        self.answer("DescribeTasks", |s| {
            s.tasks
                .iter()
                .filter(|t| arns.contains(&t.arn))
                .cloned()
                .collect()
        })
        .await
    }

    async fn describe_service(&self, _: &str, _: &str) -> Result<ServiceView, ApiError> {
        let answer = self
            .answer("DescribeServices", |s| s.service.clone())
            .await?;
        answer.ok_or_else(|| ApiError::Refused("MISSING".to_owned()))
    }

    async fn list_tasks(&self, _: &str, _: &str) -> Result<Vec<String>, ApiError> {
        self.answer("ListTasks", |s| {
            s.tasks.iter().map(|t| t.arn.clone()).collect()
        })
        .await
    }
}

fn at(secs: u64) -> Option<SystemTime> {
    Some(UNIX_EPOCH + Duration::from_secs(secs))
}

fn task(arn: &str, deployment: &str, started: u64) -> TaskView {
    TaskView {
        arn: arn.to_owned(),
        group: Some("service:web".to_owned()),
        deployment: Some(deployment.to_owned()),
        started_at: at(started),
        running: true,
    }
}

fn service(desired: u32, deployments: &[(&str, bool, u32, u32)]) -> ServiceView {
    ServiceView {
        desired,
        running: deployments.iter().map(|d| d.3).sum(),
        deployments: deployments
            .iter()
            .enumerate()
            .map(|(i, (id, primary, desired, running))| DeploymentView {
                id: (*id).to_owned(),
                primary: *primary,
                desired: *desired,
                running: *running,
                created_at: at(u64::try_from(i).unwrap() * 100),
            })
            .collect(),
    }
}

fn me(arn: &str, deployment: &str) -> TaskInfo {
    TaskInfo {
        cluster: "c".to_owned(),
        task_arn: arn.to_owned(),
        service: "web".to_owned(),
        deployment: Some(deployment.to_owned()),
    }
}

const INTERVAL: Duration = Duration::from_secs(30);

fn settings() -> DrainSettings {
    DrainSettings {
        check_interval: INTERVAL,
        call_timeout: Duration::from_secs(5),
    }
}

/// Three tasks of one deployment, all wanted.
fn steady() -> Scripted {
    let api = Scripted::default();
    {
        let mut s = api.state();
        s.service = Some(service(3, &[("d1", true, 3, 3)]));
        s.tasks = vec![
            task("a", "d1", 10),
            task("b", "d1", 20),
            task("c", "d1", 30),
        ];
    }
    api
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

#[tokio::test(start_paused = true)]
async fn scale_in_makes_exactly_the_surplus_leave_and_a_rise_brings_it_back() {
    let api = steady();
    let drains: Vec<Drain> = ["a", "b", "c"]
        .iter()
        .map(|arn| Drain::watch(api.clone(), me(arn, "d1"), settings()))
        .collect();
    pass(INTERVAL * 2).await;
    assert!(drains.iter().all(|d| d.membership() == Membership::Wanted));
    assert_eq!(
        api.calls("ListTasks"),
        0,
        "no list while nothing is surplus"
    );
    api.state().service = Some(service(1, &[("d1", true, 1, 3)]));
    pass(INTERVAL * 2).await;
    let leaving: Vec<bool> = drains.iter().map(|d| d.membership().is_leaving()).collect();
    // a and b started first: they go.
    assert_eq!(leaving, [true, true, false]);
    assert_eq!(
        drains[0].membership(),
        Membership::Leaving(LeaveReason::Surplus {
            running: 3,
            desired: 1
        })
    );
    // The desired count rises before ECS stopped them: wanted again.
    api.state().service = Some(service(3, &[("d1", true, 3, 3)]));
    pass(INTERVAL * 2).await;
    assert!(drains.iter().all(|d| d.membership() == Membership::Wanted));
}

#[tokio::test(start_paused = true)]
async fn a_deployment_replaces_the_old_tasks_once_the_new_ones_run() {
    let api = steady();
    let old = Drain::watch(api.clone(), me("a", "d1"), settings());
    {
        let mut s = api.state();
        // The new deployment has started one of three tasks.
        s.service = Some(service(3, &[("d1", false, 3, 3), ("d2", true, 3, 1)]));
        s.tasks.push(task("n1", "d2", 500));
    }
    pass(INTERVAL * 2).await;
    // Four running, three wanted: the oldest goes first, already.
    assert!(old.membership().is_leaving(), "{}", old.membership());
    let b = Drain::watch(api.clone(), me("b", "d1"), settings());
    pass(INTERVAL * 2).await;
    assert_eq!(b.membership(), Membership::Wanted, "only the surplus");
    api.state().service = Some(service(3, &[("d1", false, 3, 3), ("d2", true, 3, 3)]));
    pass(INTERVAL * 2).await;
    assert_eq!(
        b.membership(),
        Membership::Leaving(LeaveReason::Replaced {
            deployment: "d1".to_owned(),
            primary: "d2".to_owned()
        })
    );
}

#[tokio::test(start_paused = true)]
async fn it_asks_about_twice_a_minute_and_lists_only_when_the_counts_change() {
    let api = steady();
    let drain = Drain::watch(api.clone(), me("a", "d1"), settings());
    pass(Duration::from_secs(600)).await;
    let checks = api.calls("DescribeServices");
    // Ten minutes at one check per 30 s on average, jittered.
    assert!((15..=25).contains(&checks), "{checks} checks in 10 minutes");
    api.state().service = Some(service(1, &[("d1", true, 1, 3)]));
    pass(Duration::from_secs(600)).await;
    assert!(drain.membership().is_leaving());
    // The counts changed once: one list, reused while they stay the same (and renewed
    // now and then).
    assert!(api.calls("ListTasks") <= 3, "{}", api.calls("ListTasks"));
    let all = api.state().calls.len();
    assert!(all <= 3 * 20, "{all} calls in 20 minutes");
}

#[tokio::test(start_paused = true)]
async fn tasks_that_start_together_do_not_ask_together() {
    let api = steady();
    let _drains: Vec<Drain> = (0..20)
        .map(|_| Drain::watch(api.clone(), me("a", "d1"), settings()))
        .collect();
    // In any one second, only a few of the twenty ask.
    let mut most = 0;
    for _ in 0..120 {
        let before = api.calls("DescribeServices");
        pass(Duration::from_secs(1)).await;
        most = most.max(api.calls("DescribeServices") - before);
    }
    assert!(most <= 5, "{most} of 20 tasks asked in the same second");
}

#[tokio::test(start_paused = true)]
async fn access_denied_turns_the_watcher_off_for_good() {
    let api = steady();
    api.state().fault = Some(ApiError::Denied("not authorized".to_owned()));
    let drain = Drain::watch(api.clone(), me("a", "d1"), settings());
    pass(INTERVAL * 10).await;
    assert_eq!(api.state().calls.len(), 1, "one call, then off");
    assert_eq!(drain.membership(), Membership::Wanted);
}

#[tokio::test(start_paused = true)]
async fn throttling_backs_off() {
    let api = steady();
    api.state().fault = Some(ApiError::Throttled("Rate exceeded".to_owned()));
    let _drain = Drain::watch(api.clone(), me("a", "d1"), settings());
    pass(Duration::from_secs(1_200)).await;
    let calls = api.state().calls.len();
    // Doubling up to 8 intervals: far fewer than the 40 of a healthy 20 minutes.
    assert!(calls <= 12, "{calls} calls in 20 minutes while throttled");
    api.state().fault = None;
    let before = api.state().calls.len();
    // The wait under way ends (at most 8 intervals, jittered), then every 30 s again.
    pass(Duration::from_secs(1_200)).await;
    assert!(
        api.state().calls.len() - before >= 20,
        "back to the interval"
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_or_unreadable_ecs_never_makes_a_task_leave() {
    for fault in [
        ApiError::Unavailable("no answer".to_owned()),
        ApiError::Malformed("not a list".to_owned()),
    ] {
        let api = steady();
        let drain = Drain::watch(api.clone(), me("a", "d1"), settings());
        pass(INTERVAL * 2).await;
        // ECS wants fewer tasks, but no answer says so.
        {
            let mut s = api.state();
            s.service = Some(service(1, &[("d1", true, 1, 3)]));
            s.fault = Some(fault.clone());
        }
        pass(INTERVAL * 4).await;
        assert_eq!(drain.membership(), Membership::Wanted, "{fault}");
        api.state().fault = None;
        pass(INTERVAL * 2).await;
        assert!(drain.membership().is_leaving(), "{fault}");
    }
}

#[tokio::test(start_paused = true)]
async fn every_call_is_bounded_in_time_and_a_stale_leave_is_dropped() {
    let api = steady();
    api.state().service = Some(service(1, &[("d1", true, 1, 3)]));
    let drain = Drain::watch(api.clone(), me("a", "d1"), settings());
    pass(INTERVAL * 2).await;
    assert!(drain.membership().is_leaving());
    // ECS stops answering: each call gives up after 5 s; the last answer stands...
    api.state().delay = Duration::from_secs(3_600);
    pass(INTERVAL).await;
    assert!(drain.membership().is_leaving(), "the last answer stands");
    // ... but not for ever: a task never leaves on doubt.
    pass(INTERVAL * 4).await;
    assert_eq!(drain.membership(), Membership::Wanted);
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
async fn a_wanted_task_does_not_list_again_as_the_surplus_stops() {
    let api = steady();
    api.state().service = Some(service(1, &[("d1", true, 1, 3)]));
    let c = Drain::watch(api.clone(), me("c", "d1"), settings());
    pass(INTERVAL * 2).await;
    assert_eq!(c.membership(), Membership::Wanted);
    let lists = api.calls("ListTasks");
    assert_eq!(lists, 1);
    // a and b stop, one after the other.
    for running in [2, 1] {
        {
            let mut s = api.state();
            s.service = Some(service(1, &[("d1", true, 1, running)]));
            s.tasks.remove(0);
        }
        pass(INTERVAL * 2).await;
        assert_eq!(c.membership(), Membership::Wanted);
    }
    assert_eq!(
        api.calls("ListTasks"),
        lists,
        "listed again while only stops happened"
    );
}
