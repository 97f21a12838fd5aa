//! What a handler gets and can do, in-process against moto and the fake agent: a
//! batch handler's partial failures, the job timeout, the shutdown token, extending
//! its own message, every attribute, queue weights, and the health the endpoint
//! reports.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::primitives::Blob;
use aws_sdk_sqs::types::{
    MessageAttributeValue, MessageSystemAttributeNameForSends, MessageSystemAttributeValue,
};
use e2e::agent::FakeAgent;
use e2e::counting::{CountingProxy, Fault};
use e2e::moto::{Moto, create_queue_with, queue_counts, send, send_all};
use e2e::wait_for;
use e2e::worker::WorkerSpec;
use queue_consumer::handler::{Attribute, ExtendError};
use queue_consumer::{BatchResponse, Job, Verdict, batch_handler_fn, handler_fn};

const STEP: Duration = Duration::from_secs(20);

async fn wait_counts(client: &Client, queue: &str, what: &str, want: (u64, u64)) {
    wait_for(what, STEP, || async {
        (queue_counts(client, queue).await == Some(want)).then_some(())
    })
    .await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[tokio::test]
async fn queue_consumer_handler_a_batch_reports_its_failures() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    let bodies: Vec<String> = ["ok1", "bad", "ok2", "ok3", "ok4"]
        .map(str::to_owned)
        .to_vec();
    send_all(&client, &queue, None, &bodies).await;
    let batches: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let handler = {
        let batches = Arc::clone(&batches);
        batch_handler_fn(move |jobs: Vec<Job>| {
            let batches = Arc::clone(&batches);
            async move {
                lock(&batches).push(jobs.iter().map(|j| j.body.clone()).collect());
                let mut response = BatchResponse::default();
                for job in jobs.iter().filter(|j| j.body == "bad") {
                    response.fail(&job.message_id);
                }
                response
            }
        })
    };
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .settings(|s| s.concurrency = 10)
        .spawn_batched(handler)
        .await;
    // The four done are deleted; the failed one is retried later (30 s on).
    wait_counts(&client, &queue, "only the failed one held", (0, 1)).await;
    let batches = lock(&batches).clone();
    assert_eq!(batches.len(), 1, "{batches:?}");
    assert_eq!(batches[0], bodies, "one call, in the order sent");
    let _ = worker.stop(STEP).await;
    assert_eq!(queue_counts(&client, &queue).await, Some((0, 1)));
}

#[tokio::test]
async fn queue_consumer_handler_a_fifo_batch_keeps_each_group_in_order() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let (queue, _) = create_queue_with(&client, "jobs.fifo", 30, None).await;
    let a: Vec<String> = ["a1", "a2"].map(str::to_owned).to_vec();
    send_all(&client, &queue, Some("a"), &a).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let handler = {
        let calls = Arc::clone(&calls);
        batch_handler_fn(move |jobs: Vec<Job>| {
            let calls = Arc::clone(&calls);
            async move {
                let mut response = BatchResponse::default();
                // The first call fails a1 and (wrongly) says a2 is done.
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    response.fail(&jobs[0].message_id);
                }
                response
            }
        })
    };
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .settings(|s| s.concurrency = 10)
        .spawn_batched(handler)
        .await;
    wait_for("the first call", STEP, || async {
        (calls.load(Ordering::SeqCst) >= 1).then_some(())
    })
    .await;
    // a2 was not deleted before a1: handed back (visible, but SQS delivers nothing of
    // the group while a1 is in flight), a1 retried later.
    wait_counts(&client, &queue, "the group held back", (1, 1)).await;
    let _ = worker.stop(STEP).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn queue_consumer_handler_a_job_past_its_timeout_is_stopped_and_retried() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    send(&client, &queue, "stuck").await;
    send(&client, &queue, "quick").await;
    let dropped = Arc::new(AtomicBool::new(false));
    let quick_done = Arc::new(AtomicBool::new(false));
    /// Sets its flag when dropped: the job's future was dropped.
    struct OnDrop(Arc<AtomicBool>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let handler = {
        let (dropped, quick_done) = (Arc::clone(&dropped), Arc::clone(&quick_done));
        handler_fn(move |job: Job| {
            let (dropped, quick_done) = (Arc::clone(&dropped), Arc::clone(&quick_done));
            async move {
                if job.body == "stuck" {
                    let _flag = OnDrop(dropped);
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                } else {
                    quick_done.store(true, Ordering::SeqCst);
                }
                Verdict::Done
            }
        })
    };
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .settings(|s| {
            s.concurrency = 1;
            s.job_timeout = Some(Duration::from_secs(1));
        })
        .spawn(handler)
        .await;
    // The stuck job is stopped, its slot freed for the other, and it is retried later.
    wait_for("the stuck job to be stopped", STEP, || async {
        (dropped.load(Ordering::SeqCst) && quick_done.load(Ordering::SeqCst)).then_some(())
    })
    .await;
    wait_counts(&client, &queue, "the stuck one retried later", (0, 1)).await;
    let _ = worker.stop(STEP).await;
}

#[tokio::test]
async fn queue_consumer_handler_the_shutdown_token_lets_a_job_stop_early() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    send(&client, &queue, "long").await;
    let started = Arc::new(AtomicBool::new(false));
    let handler = {
        let started = Arc::clone(&started);
        handler_fn(move |job: Job| {
            let started = Arc::clone(&started);
            async move {
                started.store(true, Ordering::SeqCst);
                tokio::select! {
                    () = job.shutdown.cancelled() => Verdict::RetryAfter(Duration::ZERO),
                    () = tokio::time::sleep(Duration::from_secs(3600)) => Verdict::Done,
                }
            }
        })
    };
    // A grace period far longer than the test: only the token ends the job early.
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .settings(|s| s.shutdown_grace = Duration::from_secs(600))
        .spawn(handler)
        .await;
    wait_for("the job to start", STEP, || async {
        started.load(Ordering::SeqCst).then_some(())
    })
    .await;
    let _ = worker.stop(Duration::from_secs(10)).await;
    // Handed back at once, for another task.
    assert_eq!(queue_counts(&client, &queue).await, Some((1, 0)));
}

/// What a job's extension answered, and the job.
type Extended = (Result<Duration, ExtendError>, Job);

#[tokio::test]
async fn queue_consumer_handler_a_job_extends_its_own_message() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 2).await;
    send(&client, &queue, "keep me").await;
    let kept: Arc<Mutex<Option<Extended>>> = Arc::default();
    let handler = {
        let kept = Arc::clone(&kept);
        handler_fn(move |job: Job| {
            let kept = Arc::clone(&kept);
            async move {
                let extended = job.extend_visibility(Duration::from_secs(60)).await;
                *lock(&kept) = Some((extended, job.clone()));
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Verdict::Done
            }
        })
    };
    // The worker runs on a runtime of its own, so that it can die as a task does.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"));
    let spec =
        WorkerSpec::new(&moto, &agent, &queue).settings(|s| s.visibility = Duration::from_secs(2));
    let _worker = runtime
        .spawn(spec.spawn(handler))
        .await
        .unwrap_or_else(|e| panic!("spawn: {e}"));
    let job = wait_for("the extension", STEP, || async {
        lock(&kept).take().map(|(extended, job)| {
            assert_eq!(extended, Ok(Duration::from_secs(60)));
            job
        })
    })
    .await;
    // The task dies: nothing is settled, no heartbeat runs. The message stays away for
    // the 60 s asked, not the queue's 2 s.
    runtime.shutdown_background();
    // About absence: three of the queue's visibility timeouts.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(queue_counts(&client, &queue).await, Some((0, 1)));
    // The worker no longer holds it.
    assert_eq!(
        job.extend_visibility(Duration::from_secs(60)).await,
        Err(ExtendError::NotHeld)
    );
}

#[tokio::test]
async fn queue_consumer_handler_every_attribute_and_the_system_ones() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    let text = |t: &str, v: &str| {
        MessageAttributeValue::builder()
            .data_type(t)
            .string_value(v)
            .build()
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let before = SystemTime::now() - Duration::from_secs(1);
    client
        .send_message()
        .queue_url(&queue)
        .message_body("with attributes")
        .message_attributes("kind", text("String", "order"))
        .message_attributes("count", text("Number.int", "3"))
        .message_attributes(
            "blob",
            MessageAttributeValue::builder()
                .data_type("Binary")
                .binary_value(Blob::new(vec![0_u8, 1, 255]))
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .message_system_attributes(
            MessageSystemAttributeNameForSends::AwsTraceHeader,
            MessageSystemAttributeValue::builder()
                .data_type("String")
                .string_value("Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1")
                .build()
                .unwrap_or_else(|e| panic!("{e}")),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("send: {e:?}"));
    let seen: Arc<Mutex<Option<Job>>> = Arc::default();
    let handler = {
        let seen = Arc::clone(&seen);
        handler_fn(move |job: Job| {
            let seen = Arc::clone(&seen);
            async move {
                *lock(&seen) = Some(job);
                Verdict::Done
            }
        })
    };
    let worker = WorkerSpec::new(&moto, &agent, &queue).spawn(handler).await;
    let job = wait_for("the job", STEP, || async { lock(&seen).take() }).await;
    let _ = worker.stop(STEP).await;
    assert_eq!(job.attribute("kind"), Some("order"));
    assert_eq!(job.attributes["count"].data_type(), "Number.int");
    assert_eq!(
        job.attributes["blob"],
        Attribute::Binary {
            data_type: "Binary".to_owned(),
            value: vec![0, 1, 255]
        }
    );
    assert_eq!(
        job.trace_header.as_deref(),
        Some("Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1")
    );
    let now = SystemTime::now();
    for (what, at) in [
        ("sent", job.sent_at),
        ("first received", job.first_received_at),
    ] {
        let at = at.unwrap_or_else(|| panic!("no {what} time"));
        assert!(at >= before && at <= now, "{what} at {at:?}");
    }
    assert_eq!(job.attempt, 1);
}

#[tokio::test]
async fn queue_consumer_handler_queue_weights_share_the_slots() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let heavy = moto.create_queue("heavy", 30).await;
    let light = moto.create_queue("light", 30).await;
    send_all(&client, &heavy, None, &vec!["heavy".to_owned(); 60]).await;
    send_all(&client, &light, None, &vec!["light".to_owned(); 60]).await;
    let started: Arc<Mutex<Vec<String>>> = Arc::default();
    let handler = {
        let started = Arc::clone(&started);
        handler_fn(move |job: Job| {
            let started = Arc::clone(&started);
            async move {
                lock(&started).push(job.body.clone());
                tokio::time::sleep(Duration::from_millis(200)).await;
                Verdict::Done
            }
        })
    };
    let worker = WorkerSpec::new(&moto, &agent, &heavy)
        .topic("lightEventsQueue", &light)
        .settings(|s| {
            s.concurrency = 4;
            s.weights = [
                ("default".to_owned(), 3),
                ("lightEventsQueue".to_owned(), 1),
            ]
            .into();
        })
        .spawn(handler)
        .await;
    // While both have work: 3 slots to the heavy queue, 1 to the light one.
    wait_for("40 jobs started", STEP, || async {
        (lock(&started).len() >= 40).then_some(())
    })
    .await;
    let first: Vec<String> = lock(&started)[..40].to_vec();
    let heavy_jobs = first.iter().filter(|b| *b == "heavy").count();
    assert!(
        (26..=34).contains(&heavy_jobs),
        "{heavy_jobs} of the first 40 jobs from the heavy queue"
    );
    let _ = worker.stop(STEP).await;
}

#[tokio::test]
async fn queue_consumer_handler_health_says_when_receiving_fails() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let queue = moto.create_queue("jobs", 30).await;
    let proxy = CountingProxy::start(([127, 0, 0, 1], moto.port()).into()).await;
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .via(&proxy.endpoint())
        .settings(|s| s.unhealthy_after = Duration::from_secs(2))
        .spawn(handler_fn(|_job: Job| async { Verdict::Done }))
        .await;
    wait_for("a receive", STEP, || async {
        (proxy.count("ReceiveMessage") >= 1).then_some(())
    })
    .await;
    assert_eq!(worker.health.check(), Ok(()));
    // SQS fails for longer than the bound: unhealthy, with the reason.
    proxy.fault("ReceiveMessage", Fault::server_error());
    let why = wait_for("unhealthy", STEP, || async { worker.health.check().err() }).await;
    assert!(
        why.contains("has failed for") && why.contains("InternalError"),
        "{why}"
    );
    proxy.clear("ReceiveMessage");
    wait_for("healthy again", STEP, || async {
        worker.health.check().is_ok().then_some(())
    })
    .await;
    let _ = worker.stop(STEP).await;
}

#[tokio::test]
async fn queue_consumer_handler_health_says_when_protection_cannot_be_had() {
    // A wrong ECS_AGENT_URI: a message waits for protection for ever, and no other
    // is received. Past the stated bound the worker is unhealthy, so ECS replaces
    // the task instead of leaving it holding one message for up to 12 h.
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    let nobody = format!("http://127.0.0.1:{}/api/task", e2e::free_port());
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .agent_uri(&nobody)
        .protection(
            task_protection::ProtectionSettings::builder()
                .acquire_timeout(Duration::from_secs(1))
                .build()
                .expect("settings"),
        )
        .settings(|s| s.protection_unhealthy_after = Duration::from_secs(3))
        .spawn(handler_fn(|_job: Job| async { Verdict::Done }))
        .await;
    send(&client, &queue, "a").await;
    wait_counts(&client, &queue, "the message held", (0, 1)).await;
    assert_eq!(worker.health.check(), Ok(()));
    let why = wait_for("unhealthy", STEP, || async { worker.health.check().err() }).await;
    assert!(
        why.contains("waited") && why.contains("task protection"),
        "{why}"
    );
    let _ = worker.stop(STEP).await;
}
