//! What the worker tells a job about its hold on the message, in-process against
//! moto behind the counting proxy: `Job::lost` fires as soon as the visibility has
//! run out without a confirmed extension, before another worker can receive the
//! message, whatever SQS answers later.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use e2e::agent::FakeAgent;
use e2e::counting::{CountingProxy, Fault};
use e2e::moto::{Moto, send};
use e2e::wait_for;
use e2e::worker::WorkerSpec;
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
    let lost_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let handler = {
        let lost_at = Arc::clone(&lost_at);
        handler_fn(move |job: Job| {
            let lost_at = Arc::clone(&lost_at);
            async move {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(20)) => Verdict::Done,
                    () = job.lost.cancelled() => {
                        *lost_at.lock().unwrap_or_else(PoisonError::into_inner) =
                            Some(Instant::now());
                        Verdict::Failed("no longer held".to_owned())
                    }
                }
            }
        })
    };
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .via(&proxy.endpoint())
        .settings(|s| s.visibility = Duration::from_secs(4))
        .spawn(handler)
        .await;
    let id = send(&client, &queue, "20 s of work").await;
    // Another worker, straight on SQS, polls for the same queue.
    let taken_at = wait_for("another worker to receive it", STEP, || async {
        let got = client
            .receive_message()
            .queue_url(&queue)
            .wait_time_seconds(1)
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
