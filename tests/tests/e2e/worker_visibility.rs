//! What the worker tells a job about its hold on the message, in-process against
//! moto behind the counting proxy: `Job::lost` fires as soon as the visibility has
//! run out without a confirmed extension, before another worker can receive the
//! message, whatever SQS answers later; and a done job's delete goes on meanwhile.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use e2e::agent::FakeAgent;
use e2e::counting::{CountingProxy, Fault};
use e2e::moto::{Moto, queue_counts, send};
use e2e::wait_for;
use e2e::worker::{Logs, WorkerSpec};
use queue_consumer::{Job, Verdict, handler_fn};
use tokio::time::Instant;

const STEP: Duration = Duration::from_secs(20);

#[tokio::test]
async fn queue_consumer_lost_fires_before_another_worker_can_receive_the_message() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 4).await;
    let proxy = CountingProxy::start(([127, 0, 0, 1], moto.port()).into()).await;
    // Every extension fails with a 500, which may pass: the worker keeps trying.
    proxy.fault("ChangeMessageVisibilityBatch", Fault::server_error());
    proxy.fault("ChangeMessageVisibility", Fault::server_error());
    // Each receive's answer reaches the worker 300 ms after SQS hid its messages: the
    // visibility runs from then, not from the answer's arrival.
    proxy.fault(
        "ReceiveMessage",
        Fault::DelayAnswer(Duration::from_millis(300)),
    );
    let lost_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let handler = {
        let lost_at = Arc::clone(&lost_at);
        handler_fn(move |job: Job| {
            let lost_at = Arc::clone(&lost_at);
            async move {
                job.lost.cancelled().await;
                *lost_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
                // Keep the slot, so that only the other worker can receive it again.
                job.shutdown.cancelled().await;
                Verdict::Failed("no longer held".to_owned())
            }
        })
    };
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .via(&proxy.endpoint())
        .settings(|s| s.visibility = Duration::from_secs(4))
        .spawn(handler)
        .await;
    let id = send(&client, &queue, "work that outlives its hold").await;
    wait_for("the job to start", STEP, || async {
        (proxy.count("ChangeMessageVisibilityBatch") > 0).then_some(())
    })
    .await;
    // Another worker, straight on SQS, polls for it (short polls, 20 ms apart).
    let taken_at = wait_for("another worker to receive it", STEP, || async {
        let got = client
            .receive_message()
            .queue_url(&queue)
            .send()
            .await
            .ok()?;
        let at = Instant::now();
        got.messages()
            .iter()
            .any(|m| m.message_id() == Some(id.as_str()))
            .then_some(at)
    })
    .await;
    let lost = *lost_at.lock().unwrap_or_else(PoisonError::into_inner);
    let lost = lost.unwrap_or_else(|| panic!("the job was not told it lost the message"));
    assert!(
        lost <= taken_at,
        "the job learnt it lost the message {:?} after another worker had it",
        lost - taken_at
    );
    let _ = worker.stop(STEP).await;
}

#[tokio::test]
async fn queue_consumer_a_done_jobs_delete_is_tried_on_after_its_visibility_ran_out() {
    // The job is done; SQS fails every delete and every extension until the message
    // is visible again. The delete keeps going and lands before anyone receives it:
    // the job runs once.
    let (logs, _capture) = Logs::capture();
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 2).await;
    let proxy = CountingProxy::start(([127, 0, 0, 1], moto.port()).into()).await;
    proxy.fault("DeleteMessageBatch", Fault::server_error());
    proxy.fault("ChangeMessageVisibilityBatch", Fault::server_error());
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = Arc::clone(&runs);
        handler_fn(move |_job: Job| {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Verdict::Done }
        })
    };
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .via(&proxy.endpoint())
        .settings(|s| s.visibility = Duration::from_secs(2))
        .spawn(handler)
        .await;
    send(&client, &queue, "done at once").await;
    wait_for("the visibility to run out", STEP, || async {
        (logs.count("Its visibility ran out while its delete was tried") == 1).then_some(())
    })
    .await;
    // Each line that says a call failed names the queue.
    let failed: Vec<String> = logs
        .lines()
        .into_iter()
        .filter(|l| l.contains("trying again") || l.contains("Extending visibility failed"))
        .collect();
    assert!(!failed.is_empty(), "no line says the delete failed");
    assert!(failed.iter().all(|l| l.contains(&queue)), "{failed:#?}");
    proxy.clear("DeleteMessageBatch");
    proxy.clear("ChangeMessageVisibilityBatch");
    wait_for("the message deleted", STEP * 2, || async {
        (queue_counts(&client, &queue).await == Some((0, 0))).then_some(())
    })
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let _ = worker.stop(STEP).await;
}
