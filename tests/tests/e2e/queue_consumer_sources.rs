//! The `queue-consumer` binary on the messages Copilot users send: SNS envelopes
//! beside raw messages, topic-specific queues in `COPILOT_TOPIC_QUEUE_URIS`, and
//! FIFO queues.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use e2e::agent::FakeAgent;
use e2e::moto::{Moto, aws_env, queue_counts, send};
use e2e::process::Service;
use e2e::wait_for;

const BIN: &str = "queue-consumer";
const STEP: Duration = Duration::from_secs(30);

fn env(
    moto: &Moto,
    agent: &FakeAgent,
    queue: &str,
    extra: &[(&'static str, String)],
) -> Vec<(&'static str, String)> {
    let mut env = aws_env(&moto.endpoint());
    env.extend([
        ("COPILOT_QUEUE_URI", queue.to_owned()),
        ("ECS_AGENT_URI", agent.uri()),
        ("TASK_PROTECTION_BACKEND", "agent".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]);
    env.extend(extra.iter().cloned());
    env
}

async fn wait_empty(client: &Client, queue: &str) {
    wait_for("the queue to be empty", STEP, || async {
        (queue_counts(client, queue).await == Some((0, 0))).then_some(())
    })
    .await;
}

async fn stop(worker: &mut Service) {
    worker.terminate();
    let status = worker.wait_exit(STEP).await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn queue_consumer_sns_envelope_and_raw_message_on_one_queue() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("events", 30).await;
    let topic = "arn:aws:sns:us-east-1:123456789012:app-test-merchant-orders";
    let envelope = serde_json::json!({
        "Type": "Notification",
        "MessageId": "5b1c0a07-6b0e-5cbb-9f5e-3d1e0f4b8d77",
        "TopicArn": topic,
        "Message": "40",
        "Timestamp": "2026-11-28T12:00:00.000Z",
        "SignatureVersion": "1",
        "MessageAttributes": {"event": {"Type": "String", "Value": "order_placed"}}
    })
    .to_string();
    let wrapped = send(&client, &queue, &envelope).await;
    let raw = send(&client, &queue, "30").await;
    let mut worker = Service::spawn(BIN, &[], &env(&moto, &agent, &queue, &[]));
    worker.wait_for_count(" - Done", 2, STEP).await;
    // The envelope's message is the job, and the job knows its topic.
    assert_eq!(
        worker.count(&format!("{wrapped} - Started ({topic})")),
        1,
        "{:#?}",
        worker.lines()
    );
    assert_eq!(
        worker.count(&format!("{wrapped} - Working for 40 milliseconds")),
        1
    );
    assert_eq!(
        worker.count(&format!("{raw} - Working for 30 milliseconds")),
        1
    );
    assert_eq!(worker.count(" - Rejected"), 0);
    wait_empty(&client, &queue).await;
    stop(&mut worker).await;
}

#[tokio::test]
async fn queue_consumer_flooded_queue_does_not_starve_a_topic_queue() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let flooded = moto.create_queue("events", 30).await;
    let quiet = moto.create_queue("orders", 30).await;
    for chunk in 0..40 {
        let entries = (0..10)
            .map(|i| {
                SendMessageBatchRequestEntry::builder()
                    .id(format!("m{chunk}-{i}"))
                    .message_body("50")
                    .build()
                    .unwrap_or_else(|e| panic!("entry: {e}"))
            })
            .collect::<Vec<_>>();
        client
            .send_message_batch()
            .queue_url(&flooded)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap_or_else(|e| panic!("send batch: {e:?}"));
    }
    let topics = format!(r#"{{"merchantOrdersEventsQueue":"{quiet}"}}"#);
    let mut worker = Service::spawn(
        BIN,
        &[],
        &env(
            &moto,
            &agent,
            &flooded,
            &[
                ("COPILOT_TOPIC_QUEUE_URIS", topics),
                ("WORKER_CONCURRENCY", "2".to_owned()),
            ],
        ),
    );
    // Busy with the flood, then one message on the topic queue.
    worker.wait_for_count(" - Done", 20, STEP).await;
    let sent = Instant::now();
    let id = send(&client, &quiet, "0").await;
    worker
        .wait_for_line(&format!("{id} - Done"), Duration::from_secs(10))
        .await;
    let took = sent.elapsed();
    let left = queue_counts(&client, &flooded).await.map_or(0, |(v, _)| v);
    assert!(left > 100, "the flood was over already: {left} left");
    // moto answers a waiting long poll within a second of a send: allow that once.
    assert!(took < Duration::from_secs(2), "served after {took:?}");
    assert_eq!(
        worker.count(&format!("{id} - Started (merchantOrdersEventsQueue)")),
        1
    );
    stop(&mut worker).await;
}

#[tokio::test]
async fn queue_consumer_fifo_groups_in_order_and_overlapping() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = client
        .create_queue()
        .queue_name("jobs.fifo")
        .attributes(QueueAttributeName::FifoQueue, "true")
        .attributes(QueueAttributeName::VisibilityTimeout, "30")
        .send()
        .await
        .unwrap_or_else(|e| panic!("create_queue: {e:?}"))
        .queue_url
        .unwrap_or_default();
    // 3 groups x 20, sent interleaved; each group's order is its send order.
    let mut order: HashMap<String, (usize, usize)> = HashMap::new();
    for i in 0..20 {
        for g in 0..3 {
            let id = client
                .send_message()
                .queue_url(&queue)
                .message_group_id(format!("g{g}"))
                .message_deduplication_id(format!("g{g}-{i}"))
                .message_body("30")
                .send()
                .await
                .unwrap_or_else(|e| panic!("send: {e:?}"))
                .message_id
                .unwrap_or_default();
            order.insert(id, (g, i));
        }
    }
    let mut worker = Service::spawn(
        BIN,
        &[],
        &env(
            &moto,
            &agent,
            &queue,
            // moto's long poll on a FIFO queue takes the groups in flight at its start
            // for its whole wait, so a group freed meanwhile waits for the next poll:
            // keep each poll short.
            &[
                ("WORKER_CONCURRENCY", "5".to_owned()),
                ("QUEUE_WAIT_SECONDS", "1".to_owned()),
            ],
        ),
    );
    worker
        .wait_for_count(" - Done", 60, Duration::from_secs(60))
        .await;
    wait_empty(&client, &queue).await;
    stop(&mut worker).await;

    let event = |line: &str| {
        let (step, rest) = if let Some(at) = line.find(" - Working for ") {
            ("start", &line[..at])
        } else if let Some(at) = line.find(" - Done") {
            ("end", &line[..at])
        } else {
            return None;
        };
        let id = rest.rsplit(' ').next()?;
        Some((step, *order.get(id)?))
    };
    let mut next = [0usize; 3];
    let mut running = [false; 3];
    let mut most_groups = 0;
    for line in worker.lines() {
        let Some((step, (g, i))) = event(&line) else {
            continue;
        };
        if step == "start" {
            assert!(!running[g], "two messages of g{g} at once at {i}");
            assert_eq!(next[g], i, "g{g} out of order");
            running[g] = true;
            most_groups = most_groups.max(running.iter().filter(|r| **r).count());
        } else {
            running[g] = false;
            next[g] += 1;
        }
    }
    assert_eq!(next, [20, 20, 20]);
    assert!(most_groups >= 2, "the groups never overlapped");
}
