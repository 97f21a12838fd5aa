//! The worker library in-process (`spawn_worker`) with handlers of the tests' own,
//! against moto and the fake agent: a panicking handler, and FIFO group order when a
//! message fails.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::QueueAttributeName;
use e2e::agent::FakeAgent;
use e2e::moto::{Moto, queue_counts, send};
use e2e::wait_for;
use e2e::worker::spawn_worker;
use queue_consumer::{Job, Outcome, Verdict, handler_fn};
use task_protection::cli::Signal;
use tokio::time::Instant;

const STEP: Duration = Duration::from_secs(20);

async fn wait_counts(client: &Client, queue: &str, what: &str, want: (u64, u64), within: Duration) {
    wait_for(what, within, || async {
        (queue_counts(client, queue).await == Some(want)).then_some(())
    })
    .await;
}

/// A FIFO queue with content-based deduplication.
pub(crate) async fn create_fifo(client: &Client, name: &str) -> String {
    client
        .create_queue()
        .queue_name(name)
        .attributes(QueueAttributeName::FifoQueue, "true")
        .attributes(QueueAttributeName::ContentBasedDeduplication, "true")
        .attributes(QueueAttributeName::VisibilityTimeout, "30")
        .send()
        .await
        .unwrap_or_else(|e| panic!("create_queue {name}: {e:?}"))
        .queue_url
        .unwrap_or_else(|| panic!("create_queue {name}: no URL"))
}

/// Sends `(group, body)` pairs in order to a FIFO queue.
pub(crate) async fn send_fifo(client: &Client, queue: &str, messages: &[(&str, String)]) {
    for (group, body) in messages {
        client
            .send_message()
            .queue_url(queue)
            .message_group_id(*group)
            .message_body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("send {body}: {e:?}"));
    }
}

#[tokio::test]
async fn queue_consumer_library_a_panicking_handler_is_retried_and_frees_its_slot() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    for body in ["panic", "1", "2", "3", "4"] {
        send(&client, &queue, body).await;
    }
    let panics = Arc::new(AtomicUsize::new(0));
    let handler = {
        let panics = Arc::clone(&panics);
        handler_fn(move |job: Job| {
            let panics = Arc::clone(&panics);
            async move {
                if job.body == "panic" {
                    panics.fetch_add(1, Ordering::SeqCst);
                    panic!("the handler panics on {}", job.message_id);
                }
                Verdict::Done
            }
        })
    };
    // One slot: the four others can only be done if the panic freed it. A visibility
    // of 2 s: a message left unsettled would be back within the window below.
    let worker = spawn_worker(handler, &moto, &agent, &queue, &[], |s| {
        s.concurrency = 1;
        s.visibility = Duration::from_secs(2);
    })
    .await;
    let started = Instant::now();
    // Done promptly, and the panicking one held back as a retry, not deleted.
    wait_counts(&client, &queue, "four done, one retried", (0, 1), STEP).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // Settled as a retry (back after its backoff, 30 s or more), not left to its 2 s
    // visibility: no second run within 5 s.
    let again = tokio::time::timeout(Duration::from_secs(5), async {
        while panics.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(again.is_err(), "the panicking message came straight back");
    assert_eq!(panics.load(Ordering::SeqCst), 1);
    let outcome = worker.stop(Duration::from_secs(5)).await;
    assert_eq!(outcome, Outcome::Stopped(Signal::Term));
    assert_eq!(queue_counts(&client, &queue).await, Some((0, 1)));
}

/// What a handler saw: (body, event) in order, event "start" or "end".
type Events = Arc<Mutex<Vec<(String, &'static str)>>>;

#[tokio::test]
async fn queue_consumer_library_a_failed_fifo_message_holds_back_only_its_group() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = create_fifo(&client, "jobs.fifo").await;
    let mut messages: Vec<(&str, String)> = (1..=4).map(|i| ("a", format!("a{i}"))).collect();
    messages.extend((1..=6).map(|i| ("b", format!("b{i}"))));
    send_fifo(&client, &queue, &messages).await;

    let events: Events = Arc::default();
    let running: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let handler = {
        let events = Arc::clone(&events);
        let running = Arc::clone(&running);
        handler_fn(move |job: Job| {
            let events = Arc::clone(&events);
            let running = Arc::clone(&running);
            async move {
                let group = job.group_id.clone().unwrap_or_default();
                let lock = || running.lock().unwrap_or_else(PoisonError::into_inner);
                let at_once = {
                    let mut r = lock();
                    let n = r.entry(group.clone()).or_default();
                    *n += 1;
                    *n
                };
                events
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((job.body.clone(), "start"));
                assert_eq!(at_once, 1, "two messages of group {group} at once");
                tokio::time::sleep(Duration::from_millis(100)).await;
                *lock().entry(group).or_default() -= 1;
                events
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((job.body.clone(), "end"));
                if job.body == "a2" && job.receive_count == 1 {
                    Verdict::RetryAfter(Duration::from_secs(5))
                } else {
                    Verdict::Done
                }
            }
        })
    };
    // Room for all ten in one receive: the order within a batch is the worker's.
    let worker = spawn_worker(handler, &moto, &agent, &queue, &[], |s| {
        s.concurrency = 10;
    })
    .await;
    wait_counts(&client, &queue, "every message done", (0, 0), STEP).await;
    let _ = worker.stop(Duration::from_secs(5)).await;

    let events = events
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let starts: Vec<&str> = events
        .iter()
        .filter(|(_, e)| *e == "start")
        .map(|(b, _)| b.as_str())
        .collect();
    let a: Vec<&str> = starts
        .iter()
        .copied()
        .filter(|b| b.starts_with('a'))
        .collect();
    let b: Vec<&str> = starts
        .iter()
        .copied()
        .filter(|b| b.starts_with('b'))
        .collect();
    // Group a in order, a2 twice, nothing of a after a2 before a2 came back.
    assert_eq!(a, ["a1", "a2", "a2", "a3", "a4"], "{events:?}");
    assert_eq!(b, ["b1", "b2", "b3", "b4", "b5", "b6"], "{events:?}");
    // Group b went on while a was held: all of b ended before a2's second start.
    let pos = |body: &str, event: &str, nth: usize| {
        events
            .iter()
            .enumerate()
            .filter(|(_, (b, e))| b == body && *e == event)
            .nth(nth)
            .map(|(i, _)| i)
            .unwrap_or_else(|| panic!("no {event} {nth} of {body}: {events:?}"))
    };
    assert!(pos("b6", "end", 0) < pos("a2", "start", 1), "{events:?}");
}

/// A tracing writer into a shared buffer.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn queue_consumer_library_a_panic_is_one_line_in_json_logs() {
    // The JSON logs of this thread, where the runtime (current-thread) runs the job.
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(move || writer.clone())
        .finish();
    let logs = tracing::subscriber::set_default(subscriber);
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    send(&client, &queue, "boom").await;
    let handler = handler_fn(|job: Job| async move {
        panic!("the job {} went wrong\nover two lines", job.body);
    });
    let worker = spawn_worker(handler, &moto, &agent, &queue, &[], |_| {}).await;
    let logged = |needle: &'static str| {
        let captured = captured.clone();
        move || {
            let found =
                String::from_utf8_lossy(&captured.0.lock().unwrap_or_else(PoisonError::into_inner))
                    .contains(needle);
            async move { found.then_some(()) }
        }
    };
    wait_for("the message retried", STEP, logged("Visible again in")).await;
    let _ = worker.stop(Duration::from_secs(5)).await;
    // From here a failed assertion must not go into the captured logs.
    drop(logs);
    let text = String::from_utf8_lossy(
        &captured
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone(),
    )
    .into_owned();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let panics: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("panicked") && m.contains("went wrong"))
                && l["level"] == "ERROR"
        })
        .collect();
    assert!(!panics.is_empty(), "no panic line in {text}");
    // The message's own line says where, in one line.
    assert!(
        panics.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("worker_library.rs"))),
        "{text}"
    );
}
