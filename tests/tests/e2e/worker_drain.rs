//! The worker leaving its service (`Worker::with_membership`), in-process against
//! moto and the fake agent, with the membership driven by the test as the drain
//! watcher would: no new work, what is held finished and settled, protection
//! released, and work again once wanted again. Nothing lost, nothing done twice.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_sdk_sqs::Client;
use e2e::agent::{Answer, FakeAgent};
use e2e::counting::CountingProxy;
use e2e::moto::{Moto, queue_counts, send};
use e2e::wait_for;
use e2e::worker::WorkerSpec;
use queue_consumer::{Job, Outcome, Verdict, handler_fn};
use task_protection::ProtectionSettings;
use task_protection::cli::Signal;
use task_protection::drain::{LeaveReason, Membership};
use tokio::sync::watch;

const STEP: Duration = Duration::from_secs(20);

async fn wait_counts(client: &Client, queue: &str, what: &str, want: (u64, u64)) {
    wait_for(what, STEP, || async {
        (queue_counts(client, queue).await == Some(want)).then_some(())
    })
    .await;
}

/// How many times each body's job started, and a handler that waits the
/// milliseconds the body's last word names.
#[derive(Debug, Clone, Default)]
struct Runs(Arc<Mutex<BTreeMap<String, usize>>>);

impl Runs {
    fn handler(&self) -> impl queue_consumer::Handler {
        let runs = self.clone();
        handler_fn(move |job: Job| {
            let runs = runs.clone();
            async move {
                *runs.lock().entry(job.body.clone()).or_default() += 1;
                let ms = job
                    .body
                    .rsplit(' ')
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Verdict::Done
            }
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn of(&self, body: &str) -> usize {
        self.lock().get(body).copied().unwrap_or(0)
    }
}

fn surplus() -> Membership {
    Membership::Leaving(LeaveReason::Surplus {
        running: 3,
        desired: 1,
    })
}

#[tokio::test]
async fn queue_consumer_drain_finishes_what_it_holds_then_takes_work_again() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    let proxy = CountingProxy::start(([127, 0, 0, 1], moto.port()).into()).await;
    let (membership, follows) = watch::channel(Membership::Wanted);
    let runs = Runs::default();
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .via(&proxy.endpoint())
        .settings(|s| s.concurrency = 2)
        .membership(follows)
        .spawn(runs.handler())
        .await;
    for body in ["a 2000", "b 2000"] {
        send(&client, &queue, body).await;
    }
    wait_for("both jobs to start", STEP, || async {
        (runs.of("a 2000") == 1 && runs.of("b 2000") == 1).then_some(())
    })
    .await;
    membership.send_replace(surplus());
    wait_for("the drain", STEP, || async {
        worker.protection.is_draining().then_some(())
    })
    .await;
    for body in ["c 10", "d 10", "e 10"] {
        send(&client, &queue, body).await;
    }
    // The two running jobs finish and are deleted; the new messages are left alone.
    wait_counts(&client, &queue, "a and b deleted, c, d, e waiting", (3, 0)).await;
    // Protection is released at once, not after the maintain window, and the task
    // keeps running unprotected for ECS to stop.
    wait_for("protection released", Duration::from_secs(5), || async {
        agent.released().then_some(())
    })
    .await;
    let receives = proxy.count("ReceiveMessage");
    // About absence: three of the worker's 1 s polls' worth of time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        proxy.count("ReceiveMessage"),
        receives,
        "received while leaving"
    );
    assert_eq!(queue_counts(&client, &queue).await, Some((3, 0)));
    // Wanted again: it takes the work.
    membership.send_replace(Membership::Wanted);
    wait_counts(&client, &queue, "c, d and e done", (0, 0)).await;
    assert!(!worker.protection.is_draining());
    for body in ["a 2000", "b 2000", "c 10", "d 10", "e 10"] {
        assert_eq!(runs.of(body), 1, "{body}: {:?}", runs.lock());
    }
    let outcome = worker.stop(STEP).await;
    assert_eq!(outcome, Outcome::Stopped(Signal::Term));
}

#[tokio::test]
async fn queue_consumer_drain_cancels_its_poll_on_its_way() {
    // A poll on its way when the task starts to leave would bring messages only to
    // hand them back, a receive each. The worker gives it up at once instead.
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    let proxy = CountingProxy::start(([127, 0, 0, 1], moto.port()).into()).await;
    let (membership, follows) = watch::channel(Membership::Wanted);
    let runs = Runs::default();
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .via(&proxy.endpoint())
        .settings(|s| s.wait = Duration::from_secs(5))
        .membership(follows)
        .spawn(runs.handler())
        .await;
    wait_for("a long poll on its way", STEP, || async {
        (proxy.count("ReceiveMessage") >= 1).then_some(())
    })
    .await;
    let left = tokio::time::Instant::now();
    membership.send_replace(surplus());
    let given_up = wait_for("the poll to be given up", STEP, || async {
        proxy.exchanges().first().and_then(|e| e.abandoned_at)
    })
    .await;
    assert!(
        given_up - left < Duration::from_secs(1),
        "the poll was given up {:?} after the task started to leave",
        given_up - left
    );
    assert!(proxy.exchanges()[0].answered_at.is_none());
    // About absence: past the end of the poll's wait, no new poll while leaving.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(proxy.count("ReceiveMessage"), 1, "received while leaving");
    // Wanted again: it takes the work.
    membership.send_replace(Membership::Wanted);
    send(&client, &queue, "a 10").await;
    wait_counts(&client, &queue, "the message done", (0, 0)).await;
    assert_eq!(runs.of("a 10"), 1);
    let outcome = worker.stop(Duration::from_secs(10)).await;
    assert_eq!(outcome, Outcome::Stopped(Signal::Term));
}

#[tokio::test]
async fn queue_consumer_drain_sigterm_while_leaving_finishes_the_running_job() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    let (membership, follows) = watch::channel(Membership::Wanted);
    let runs = Runs::default();
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .membership(follows)
        .spawn(runs.handler())
        .await;
    send(&client, &queue, "a 1500").await;
    wait_for("the job to start", STEP, || async {
        (runs.of("a 1500") == 1).then_some(())
    })
    .await;
    membership.send_replace(surplus());
    let outcome = worker.stop(Duration::from_secs(10)).await;
    assert_eq!(outcome, Outcome::Stopped(Signal::Term));
    // Finished within the grace period and deleted; released at exit.
    assert_eq!(queue_counts(&client, &queue).await, Some((0, 0)));
    assert!(agent.released(), "{:?}", agent.puts());
}

/// A worker following `membership`, asking ECS again 2 s after a refusal.
fn following(
    moto: &Moto,
    agent: &FakeAgent,
    queue: &str,
    membership: watch::Receiver<Membership>,
) -> WorkerSpec {
    WorkerSpec::new(moto, agent, queue)
        .protection(
            ProtectionSettings::builder()
                .check_interval(Duration::from_secs(2))
                .build()
                .expect("settings"),
        )
        .membership(membership)
}

#[tokio::test]
async fn queue_consumer_refused_while_wanted_pauses_then_works_the_message() {
    // With the drain watcher on, a refusal (DEPLOYMENT_BLOCKED while a deployment's
    // old tasks hold protection) is no sign that this task goes: the worker hands the
    // message back, receives nothing for the protection's check interval, then takes
    // work again. It does not end, and it does not spend the message's receives.
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    agent.always(Answer::Failure("DEPLOYMENT_BLOCKED"));
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    let (_membership, follows) = watch::channel(Membership::Wanted);
    let receives = Arc::new(Mutex::new(Vec::new()));
    let handler = {
        let receives = Arc::clone(&receives);
        handler_fn(move |job: Job| {
            receives
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(job.receive_count);
            async { Verdict::Done }
        })
    };
    let worker = following(&moto, &agent, &queue, follows)
        .spawn(handler)
        .await;
    send(&client, &queue, "a").await;
    let enables = || agent.puts().iter().filter(|p| p.enabled()).count();
    wait_for("two refused enables", STEP, || async {
        (enables() >= 2).then_some(())
    })
    .await;
    agent.always(Answer::Ok);
    wait_counts(&client, &queue, "the message done", (0, 0)).await;
    let receives = receives
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert_eq!(receives.len(), 1, "worked once: {receives:?}");
    // One receive per refusal and one that works it, give or take the one a refusal
    // meets on its way; not one per poll.
    assert!(receives[0] <= 4, "received {} times", receives[0]);
    assert_eq!(
        worker.stop(STEP).await,
        Outcome::Stopped(Signal::Term),
        "a refusal ended the worker"
    );
}

#[tokio::test]
async fn queue_consumer_refused_once_the_drain_is_off_ends_as_a_task_being_replaced() {
    // The drain watcher gives up (its permissions taken away, say): from then on
    // nothing says when this task goes, so a refusal means again what it means
    // without a drain, and the worker ends, as with DRAIN=off.
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    agent.always(Answer::Failure("DEPLOYMENT_BLOCKED"));
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    let (_membership, follows) = watch::channel(Membership::Wanted);
    let (on, on_now) = watch::channel(true);
    let worker = following(&moto, &agent, &queue, follows)
        .followed_while(on_now)
        .spawn(handler_fn(|_job: Job| async { Verdict::Done }))
        .await;
    send(&client, &queue, "a").await;
    let enables = || agent.puts().iter().filter(|p| p.enabled()).count();
    wait_for("a refused enable", STEP, || async {
        (enables() >= 1).then_some(())
    })
    .await;
    // Refused while the drain is on: paused, not ended.
    let at_first = enables();
    wait_for("another refused enable", STEP, || async {
        (enables() > at_first).then_some(())
    })
    .await;
    on.send_replace(false);
    match worker.stopped(STEP * 2).await {
        Outcome::ProtectionRefused(r) => assert_eq!(r.reason(), "DEPLOYMENT_BLOCKED"),
        other => panic!("ended with {other:?}, not the refusal"),
    }
    // The message was handed back, not lost.
    wait_counts(&client, &queue, "the message back in the queue", (1, 0)).await;
}
