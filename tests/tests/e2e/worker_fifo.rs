//! FIFO groups in-process against moto and the fake agent: a head that keeps failing
//! goes to the dead-letter queue alone (or, with `stop-group`, back with its group, as
//! SQS has it), followers wait for their head through the
//! shutdown grace period and while the task leaves its service, and a job that its
//! message's 12 h in flight can no longer hold is handed back instead of being cut
//! off.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName};
use e2e::agent::FakeAgent;
use e2e::moto::{Moto, create_queue_with, queue_counts, send_all};
use e2e::wait_for;
use e2e::worker::{Logs, WorkerSpec};
use queue_consumer::heartbeat::{CAP_MARGIN, MAX_IN_FLIGHT};
use queue_consumer::{Job, Outcome, Verdict, handler_fn};
use task_protection::cli::Signal;
use task_protection::drain::{LeaveReason, Membership};

const STEP: Duration = Duration::from_secs(20);

async fn wait_counts(client: &Client, queue: &str, what: &str, want: (u64, u64), within: Duration) {
    wait_for(what, within, || async {
        (queue_counts(client, queue).await == Some(want)).then_some(())
    })
    .await;
}

/// One run of a job: its body, receive count and attempt.
type Run = (String, u32, u32);

/// A handler that records each run and waits the milliseconds the body's last word
/// names; a body starting with `poison` always fails.
fn recording(runs: &Arc<Mutex<Vec<Run>>>) -> impl queue_consumer::Handler {
    let runs = Arc::clone(runs);
    handler_fn(move |job: Job| {
        let runs = Arc::clone(&runs);
        async move {
            runs.lock().unwrap_or_else(PoisonError::into_inner).push((
                job.body.clone(),
                job.receive_count,
                job.attempt,
            ));
            let ms = job
                .body
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            if job.body.starts_with("poison") {
                Verdict::Failed("it never works".to_owned())
            } else {
                Verdict::Done
            }
        }
    })
}

fn runs_of(runs: &Arc<Mutex<Vec<Run>>>) -> Vec<Run> {
    runs.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn queue_consumer_fifo_a_poison_head_goes_to_the_dead_letter_queue_alone() {
    let (logs, _capture) = Logs::capture();
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let (queue, dlq) = create_queue_with(&client, "jobs.fifo", 30, Some(3)).await;
    let dlq = dlq.unwrap_or_default();
    // The head carries an attribute of its own, to find on its copy.
    client
        .send_message()
        .queue_url(&queue)
        .message_group_id("A")
        .message_deduplication_id("poison")
        .message_body("poison")
        .message_attributes(
            "kind",
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value("order")
                .build()
                .unwrap_or_else(|e| panic!("attribute: {e}")),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("send: {e:?}"));
    send_all(&client, &queue, Some("A"), &strings(&["101", "102", "103"])).await;
    send_all(&client, &queue, Some("B"), &strings(&["201", "202", "203"])).await;
    let runs = Arc::default();
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .settings(|s| s.concurrency = 2)
        .spawn(recording(&runs))
        .await;
    // SQS's own redrive would take four receives of the whole group, with backoffs
    // between them (minutes), and move 101 to 103 with the head.
    wait_counts(&client, &queue, "both groups settled", (0, 0), STEP * 2).await;
    let runs = runs_of(&runs);
    let worked = |prefix: char| -> Vec<(String, u32)> {
        runs.iter()
            .filter(|(b, ..)| b.starts_with(prefix))
            .map(|(b, count, _)| (b.clone(), *count))
            .collect()
    };
    let a = worked('1');
    assert_eq!(
        a.iter().map(|(b, _)| b.as_str()).collect::<Vec<_>>(),
        ["101", "102", "103"],
        "{runs:?}"
    );
    assert!(a.iter().all(|(_, count)| *count <= 2), "{runs:?}");
    let b = worked('2');
    assert_eq!(
        b.iter().map(|(b, _)| b.as_str()).collect::<Vec<_>>(),
        ["201", "202", "203"],
        "{runs:?}"
    );
    // The head, and only it, is in the dead-letter queue, with its group and its
    // attribute.
    let moved = client
        .receive_message()
        .queue_url(&dlq)
        .max_number_of_messages(10)
        .message_attribute_names("All")
        .message_system_attribute_names(MessageSystemAttributeName::All)
        .send()
        .await
        .unwrap_or_else(|e| panic!("receive from the dead-letter queue: {e:?}"))
        .messages
        .unwrap_or_default();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(moved[0].body(), Some("poison"));
    assert_eq!(
        moved[0]
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::MessageGroupId))
            .map(String::as_str),
        Some("A")
    );
    assert_eq!(
        moved[0]
            .message_attributes()
            .and_then(|a| a.get("kind"))
            .and_then(MessageAttributeValue::string_value),
        Some("order")
    );
    assert_eq!(
        logs.count("Moved to the dead-letter queue"),
        1,
        "{:#?}",
        logs.lines()
    );
    let _ = worker.stop(STEP).await;
}

/// `FIFO_POISON_HEAD=stop-group` keeps SQS's own behaviour: the head that failed its
/// last try in this delivery goes back with its group, unworked, and the worker
/// moves nothing itself.
#[tokio::test]
async fn queue_consumer_fifo_stop_group_leaves_the_poison_head_to_sqs() {
    let (logs, _capture) = Logs::capture();
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let (queue, dlq) = create_queue_with(&client, "jobs.fifo", 30, Some(3)).await;
    let dlq = dlq.unwrap_or_default();
    send_all(
        &client,
        &queue,
        Some("A"),
        &strings(&["poison", "101", "102"]),
    )
    .await;
    let runs = Arc::default();
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .settings(|s| {
            // Room for the group in one receive, as in the default's test.
            s.concurrency = 2;
            s.poison_head = queue_consumer::config::PoisonHead::StopGroup;
        })
        .spawn(recording(&runs))
        .await;
    // Its third run, on its first delivery, is its last try (maxReceiveCount 3): with
    // the default it would be moved to the dead-letter queue now.
    wait_for("the head handed back with its group", STEP, || async {
        (logs.count("visible again in") >= 1).then_some(())
    })
    .await;
    let runs = runs_of(&runs);
    assert_eq!(
        runs.iter().map(|(b, ..)| b.as_str()).collect::<Vec<_>>(),
        ["poison", "poison", "poison"],
        "the followers never ran: {runs:?}"
    );
    assert_eq!(
        logs.count("Moved to the dead-letter queue"),
        0,
        "{:#?}",
        logs.lines()
    );
    assert_eq!(queue_counts(&client, &dlq).await, Some((0, 0)));
    let _ = worker.stop(STEP).await;
}

#[tokio::test]
async fn queue_consumer_fifo_sigterm_lets_the_group_finish_within_the_grace_period() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let (queue, _) = create_queue_with(&client, "jobs.fifo", 30, None).await;
    send_all(
        &client,
        &queue,
        Some("g"),
        &strings(&["head 1500", "f1 200", "f2 200"]),
    )
    .await;
    let runs = Arc::default();
    // Ten slots: the receive brings the whole group, which runs as one chain.
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .settings(|s| {
            s.concurrency = 10;
            s.shutdown_grace = Duration::from_secs(10);
        })
        .spawn(recording(&runs))
        .await;
    wait_for("the head to start", STEP, || async {
        (!runs_of(&runs).is_empty()).then_some(())
    })
    .await;
    // The head ends within the grace period: its followers, which no other worker
    // could take before it is done, run after it instead of going back.
    assert_eq!(worker.stop(STEP).await, Outcome::Stopped(Signal::Term));
    assert_eq!(queue_counts(&client, &queue).await, Some((0, 0)));
    let runs = runs_of(&runs);
    assert_eq!(
        runs,
        [
            ("head 1500".to_owned(), 1, 1),
            ("f1 200".to_owned(), 1, 1),
            ("f2 200".to_owned(), 1, 1)
        ]
    );
}

#[tokio::test]
async fn queue_consumer_fifo_a_job_its_window_cannot_hold_is_handed_back_not_cut() {
    let (logs, _capture) = Logs::capture();
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let (queue, _) = create_queue_with(&client, "jobs.fifo", 30, None).await;
    send_all(&client, &queue, Some("g"), &strings(&["a 5000", "b 0"])).await;
    let runs = Arc::default();
    // A job may take all but 3 s of what a message's 12 h in flight leaves once the
    // worker's margins are kept: "a" starts in time, "b" waits 5 s for it and then
    // no longer fits.
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .settings(|s| {
            s.concurrency = 10;
            s.max_job =
                MAX_IN_FLIGHT - CAP_MARGIN - queue_consumer::START_MARGIN - Duration::from_secs(3);
        })
        .spawn(recording(&runs))
        .await;
    wait_counts(&client, &queue, "both done", (0, 0), STEP).await;
    // "b" went back unworked, to the head of its group, and ran on its next
    // delivery, within a fresh 12 h.
    assert_eq!(
        runs_of(&runs),
        [("a 5000".to_owned(), 1, 1), ("b 0".to_owned(), 2, 1)]
    );
    assert_eq!(logs.count("Not started: it has"), 1, "{:#?}", logs.lines());
    assert_eq!(logs.count("12 h limit"), 0, "{:#?}", logs.lines());
    let _ = worker.stop(STEP).await;
}

#[tokio::test]
async fn queue_consumer_fifo_a_leaving_task_finishes_the_group_under_its_protection() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let (queue, _) = create_queue_with(&client, "jobs.fifo", 30, None).await;
    send_all(
        &client,
        &queue,
        Some("g"),
        &strings(&["head 1500", "f1 200", "f2 200"]),
    )
    .await;
    let (membership, follows) = tokio::sync::watch::channel(Membership::Wanted);
    let runs = Arc::default();
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .settings(|s| s.concurrency = 10)
        .membership(follows)
        .spawn(recording(&runs))
        .await;
    wait_for("the head to start", STEP, || async {
        (!runs_of(&runs).is_empty()).then_some(())
    })
    .await;
    // The task starts to leave: the protection takes no new holders, but the group
    // began before, and its later messages run after their head, protected.
    membership.send_replace(Membership::Leaving(LeaveReason::Surplus {
        running: 2,
        desired: 1,
    }));
    wait_counts(&client, &queue, "the group done", (0, 0), STEP).await;
    assert_eq!(runs_of(&runs).len(), 3, "{:?}", runs_of(&runs));
    wait_for("protection released", STEP, || async {
        agent.released().then_some(())
    })
    .await;
    // ECS held protection from the head's start until the group was done.
    let enables = agent.puts().iter().filter(|p| p.enabled()).count();
    assert_eq!(enables, 1, "{:?}", agent.puts());
    assert_eq!(worker.stop(STEP).await, Outcome::Stopped(Signal::Term));
}
