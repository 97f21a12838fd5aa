//! The worker when the mix is not uniform: an idle queue beside a busy one, a long
//! job among short ones, one FIFO group, a failing FIFO head, a retry asked for far
//! ahead, a steady trickle, failing deletes, heartbeats of many messages, a hung
//! heartbeat at the end of the grace period, and the order of a group's log lines.
//! SQS requests are counted (and timed) on the wire by the counting proxy.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use aws_sdk_sqs::Client;
use e2e::agent::FakeAgent;
use e2e::counting::{CountingProxy, Exchange, Fault};
use e2e::moto::{Moto, aws_env, create_queue_with, queue_counts, send_all};
use e2e::process::Service;
use e2e::wait_for;
use e2e::worker::WorkerSpec;
use queue_consumer::{Job, Verdict, handler_fn};

const BIN: &str = "queue-consumer";
const STEP: Duration = Duration::from_secs(20);

async fn wait_counts(client: &Client, queue: &str, what: &str, want: (u64, u64), within: Duration) {
    wait_for(what, within, || async {
        (queue_counts(client, queue).await == Some(want)).then_some(())
    })
    .await;
}

fn bodies(body: &str, n: usize) -> Vec<String> {
    vec![body.to_owned(); n]
}

/// Jobs that wait the milliseconds their body names, counting how many run at once.
#[derive(Debug, Clone, Default)]
struct Load {
    running: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
}

impl Load {
    fn handler(&self) -> impl queue_consumer::Handler {
        let load = self.clone();
        handler_fn(move |job: Job| {
            let load = load.clone();
            async move {
                let now = load.running.fetch_add(1, Ordering::SeqCst) + 1;
                load.most.fetch_max(now, Ordering::SeqCst);
                let ms = job.body.parse().unwrap_or(0);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                load.running.fetch_sub(1, Ordering::SeqCst);
                load.done.fetch_add(1, Ordering::SeqCst);
                Verdict::Done
            }
        })
    }

    fn most(&self) -> usize {
        self.most.load(Ordering::SeqCst)
    }
}

#[tokio::test]
async fn queue_consumer_mix_an_idle_queue_does_not_hold_back_a_busy_one() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let idle = moto.create_queue("idle", 30).await;
    let busy = moto.create_queue("busy", 30).await;
    send_all(&client, &busy, None, &bodies("200", 40)).await;
    let load = Load::default();
    // The main queue stays empty and long-polls for 20 s at a time.
    let worker = WorkerSpec::new(&moto, &agent, &idle)
        .topic("busyEventsQueue", &busy)
        .settings(|s| {
            s.concurrency = 10;
            s.wait = Duration::from_secs(20);
        })
        .spawn(load.handler())
        .await;
    // 40 jobs of 200 ms on 10 slots are 0.8 s of work; the idle queue's 20 s poll
    // must hold none of it up.
    wait_counts(
        &client,
        &busy,
        "the busy queue to be emptied before the idle poll ends",
        (0, 0),
        Duration::from_secs(15),
    )
    .await;
    assert!(
        load.most() >= 8,
        "at most {} jobs ran at once on 10 slots",
        load.most()
    );
    let _ = worker.stop(STEP).await;
}

/// How many of `gaps` are at least 50 ms (the longest the worker ever waits on
/// purpose for a receive or a delete), and how many there are.
fn slow(gaps: &[Duration]) -> (usize, usize) {
    assert!(!gaps.is_empty(), "no gaps measured");
    let slow = gaps
        .iter()
        .filter(|g| **g >= Duration::from_millis(50))
        .count();
    (slow, gaps.len())
}

/// For each request of `op`, the time since the last answer to `after` that came
/// before it (and after the previous request of `op`).
fn gaps(exchanges: &[Exchange], after: &str, op: &str) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut since = None;
    for e in exchanges {
        if e.operation == op {
            let answer = exchanges
                .iter()
                .filter(|a| a.operation == after)
                .filter_map(|a| a.answered_at)
                .filter(|t| *t <= e.sent_at && since.is_none_or(|s| *t >= s))
                .max();
            if let Some(answered) = answer {
                out.push(e.sent_at - answered);
            }
            since = Some(e.sent_at);
        }
    }
    out
}

#[tokio::test]
async fn queue_consumer_mix_a_long_job_does_not_slow_short_ones() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 30).await;
    let mut jobs = bodies("600000", 1);
    jobs.extend(bodies("0", 90));
    send_all(&client, &queue, None, &jobs).await;
    let proxy = CountingProxy::start(([127, 0, 0, 1], moto.port()).into()).await;
    let load = Load::default();
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .via(&proxy.endpoint())
        .settings(|s| {
            s.concurrency = 10;
            s.shutdown_grace = Duration::ZERO;
        })
        .spawn(load.handler())
        .await;
    wait_counts(
        &client,
        &queue,
        "the short jobs to be done",
        (0, 1),
        STEP * 2,
    )
    .await;
    let exchanges = proxy.exchanges();
    // A receive follows the delete that freed its slots at once, and a delete
    // follows the receive of jobs that take no time at once: neither waits for the
    // slot the long job holds.
    if std::env::var_os("E2E_TRACE").is_some() {
        let t0 = exchanges[0].sent_at;
        for e in &exchanges {
            eprintln!(
                "{:>8.1} {:>8.1} {}",
                (e.sent_at - t0).as_secs_f64() * 1000.0,
                e.answered_at
                    .map_or(-1.0, |a| (a - t0).as_secs_f64() * 1000.0),
                e.operation
            );
        }
    }
    // moto and a busy machine add their own delays now and then; a wait for the
    // long job's slot would be in (nearly) every gap.
    let receive = gaps(&exchanges, "DeleteMessageBatch", "ReceiveMessage");
    let delete = gaps(&exchanges, "ReceiveMessage", "DeleteMessageBatch");
    let (slow_receives, receives) = slow(&receive);
    let (slow_deletes, deletes) = slow(&delete);
    assert!(
        slow_receives * 2 < receives && slow_deletes * 2 < deletes,
        "{slow_receives} of {receives} receives and {slow_deletes} of {deletes} deletes waited 50 ms or more: {receive:?} {delete:?}"
    );
    let _ = worker.stop(STEP).await;
}

#[tokio::test]
async fn queue_consumer_mix_one_fifo_group_is_settled_in_batches() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let (queue, _) = create_queue_with(&client, "jobs.fifo", 30, None).await;
    send_all(&client, &queue, Some("g"), &bodies("0", 50)).await;
    let proxy = CountingProxy::start(([127, 0, 0, 1], moto.port()).into()).await;
    let mut env = aws_env(&proxy.endpoint());
    env.extend([
        ("COPILOT_QUEUE_URI", queue.clone()),
        ("ECS_AGENT_URI", agent.uri()),
        ("TASK_PROTECTION_BACKEND", "agent".to_owned()),
        ("WORKER_CONCURRENCY", "10".to_owned()),
        // moto's long poll on a FIFO queue leaves out the groups in flight at its
        // start for its whole wait.
        ("QUEUE_WAIT_SECONDS", "1".to_owned()),
    ]);
    let mut worker = Service::spawn(BIN, &[], &env);
    worker.wait_for_count(" - Done", 50, STEP).await;
    wait_counts(&client, &queue, "the group to be deleted", (0, 0), STEP).await;
    // Ten of the group per receive, worked in order, deleted in one call.
    let deletes = proxy.count("DeleteMessageBatch");
    assert!(
        deletes <= 7,
        "{deletes} delete batches: {:?}",
        proxy.counts()
    );
    worker.terminate();
    assert!(worker.wait_exit(STEP).await.success());
}

#[tokio::test]
async fn queue_consumer_mix_a_failing_fifo_head_is_retried_in_place() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    // Three tries, each run in place counting as one: enough for a head that fails
    // twice, then works.
    let (queue, dlq) = create_queue_with(&client, "jobs.fifo", 30, Some(3)).await;
    let dlq = dlq.unwrap_or_default();
    let messages: Vec<String> = ["head", "f1", "f2"].map(str::to_owned).to_vec();
    send_all(&client, &queue, Some("g"), &messages).await;
    // The head fails twice, then works.
    let runs: Arc<Mutex<Vec<(String, u32)>>> = Arc::default();
    let handler = {
        let runs = Arc::clone(&runs);
        handler_fn(move |job: Job| {
            let runs = Arc::clone(&runs);
            async move {
                let mut r = runs.lock().unwrap_or_else(PoisonError::into_inner);
                r.push((job.body.clone(), job.receive_count));
                let tries = r.iter().filter(|(b, _)| *b == job.body).count();
                if job.body == "head" && tries <= 2 {
                    Verdict::Failed("not yet".to_owned())
                } else {
                    Verdict::Done
                }
            }
        })
    };
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .settings(|s| s.concurrency = 10)
        .spawn(handler)
        .await;
    wait_counts(&client, &queue, "the group to be done", (0, 0), STEP).await;
    assert_eq!(queue_counts(&client, &dlq).await, Some((0, 0)));
    let runs = runs.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let order: Vec<&str> = runs.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(order, ["head", "head", "head", "f1", "f2"], "{runs:?}");
    // Nothing was received twice: the followers kept their receive count.
    assert!(runs.iter().all(|(_, count)| *count == 1), "{runs:?}");
    let _ = worker.stop(STEP).await;
}

#[tokio::test]
async fn queue_consumer_mix_a_retry_near_twelve_hours_is_accepted() {
    let moto = Moto::start().await;
    let agent = FakeAgent::start().await;
    let client = moto.client();
    let queue = moto.create_queue("jobs", 2).await;
    send_all(&client, &queue, None, &bodies("later", 1)).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = Arc::clone(&runs);
        handler_fn(move |_job: Job| {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                // Time in flight counts towards SQS's 12 h limit.
                tokio::time::sleep(Duration::from_millis(1500)).await;
                Verdict::RetryAfter(Duration::from_secs(12 * 60 * 60))
            }
        })
    };
    let worker = WorkerSpec::new(&moto, &agent, &queue)
        .settings(|s| s.visibility = Duration::from_secs(2))
        .spawn(handler)
        .await;
    wait_for("the job to run", STEP, || async {
        (runs.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    // About absence: three visibility timeouts without the message coming back.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "the message came back");
    assert_eq!(queue_counts(&client, &queue).await, Some((0, 1)));
    let _ = worker.stop(STEP).await;
}

/// moto, a queue, a fake agent, and the binary's environment for them.
struct Binary {
    moto: Moto,
    agent: FakeAgent,
    client: Client,
    queue: String,
}

impl Binary {
    async fn start(queue: &str, visibility_secs: u32) -> Self {
        let moto = Moto::start().await;
        let agent = FakeAgent::start().await;
        let client = moto.client();
        let (queue, _) = create_queue_with(&client, queue, visibility_secs, None).await;
        Self {
            moto,
            agent,
            client,
            queue,
        }
    }

    async fn proxy(&self) -> CountingProxy {
        CountingProxy::start(([127, 0, 0, 1], self.moto.port()).into()).await
    }

    fn spawn(&self, endpoint: &str, extra: &[(&'static str, &str)]) -> Service {
        let mut env = aws_env(endpoint);
        env.extend([
            ("COPILOT_QUEUE_URI", self.queue.clone()),
            ("ECS_AGENT_URI", self.agent.uri()),
            ("TASK_PROTECTION_BACKEND", "agent".to_owned()),
        ]);
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        Service::spawn(BIN, &[], &env)
    }

    async fn send(&self, body: &str, group: Option<&str>) -> String {
        let mut request = self
            .client
            .send_message()
            .queue_url(&self.queue)
            .message_body(body);
        if let Some(g) = group {
            request = request
                .message_group_id(g)
                .message_deduplication_id(format!("{body}-{}", rand_id()));
        }
        request
            .send()
            .await
            .unwrap_or_else(|e| panic!("send: {e:?}"))
            .message_id
            .unwrap_or_default()
    }
}

fn rand_id() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[tokio::test]
async fn queue_consumer_mix_a_steady_trickle_does_not_flap_protection() {
    // The defaults: protection for 1 minute, kept 10 % (6 s) after the last enable.
    let b = Binary::start("jobs", 30).await;
    let mut worker = b.spawn(&b.moto.endpoint(), &[("RUST_LOG", "info")]);
    worker
        .wait_for_line("Long polling for messages", STEP)
        .await;
    // One short job a second for a minute.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    for _ in 0..60 {
        tick.tick().await;
        b.send("10", None).await;
    }
    worker.wait_for_count(" - Done", 60, STEP).await;
    let last_done = std::time::Instant::now();
    let puts = b.agent.puts();
    assert!(
        puts.len() <= 2,
        "{} protection PUTs for a minute of one job a second: {:?}",
        puts.len(),
        puts.iter()
            .map(e2e::agent::Recorded::enabled)
            .collect::<Vec<_>>()
    );
    // Idle again: released within the maintain window (and the quiet second).
    wait_for(
        "protection to be released",
        Duration::from_secs(15),
        || async { (!b.agent.ecs_protected_at(std::time::Instant::now())).then_some(()) },
    )
    .await;
    let released = b
        .agent
        .ecs_changes()
        .last()
        .map(|(at, _)| *at)
        .unwrap_or(last_done);
    assert!(
        released.saturating_duration_since(last_done) < Duration::from_secs(9),
        "released {:?} after the last job",
        released.saturating_duration_since(last_done)
    );
    worker.terminate();
    assert!(worker.wait_exit(STEP).await.success());
}

#[tokio::test]
async fn queue_consumer_mix_a_failing_delete_keeps_protection_60_s_to_the_second() {
    let b = Binary::start("jobs", 30).await;
    let proxy = b.proxy().await;
    // Every delete hangs: each try takes the 5 s call time limit.
    proxy.fault("DeleteMessageBatch", Fault::Hang);
    let mut worker = b.spawn(&proxy.endpoint(), &[]);
    let id = b.send("10", None).await;
    worker
        .wait_for_line(&format!("{id} - Working for"), STEP)
        .await;
    let ended = std::time::Instant::now();
    wait_for(
        "protection to be released",
        Duration::from_secs(90),
        || async { b.agent.released().then_some(()) },
    )
    .await;
    let (released, _) = b
        .agent
        .ecs_changes()
        .last()
        .copied()
        .unwrap_or((ended, None));
    let held = released.saturating_duration_since(ended);
    // 60 s of tries, then the quiet second before the release.
    assert!(
        held >= Duration::from_secs(59) && held < Duration::from_millis(62_500),
        "protected {held:?} for a delete that kept failing"
    );
    worker.terminate();
    assert!(worker.wait_exit(STEP).await.success());
}

#[tokio::test]
async fn queue_consumer_mix_heartbeats_of_messages_received_together_are_one_call() {
    let b = Binary::start("jobs", 2).await;
    for _ in 0..5 {
        b.send("6000", None).await;
    }
    let proxy = b.proxy().await;
    let mut worker = b.spawn(
        &proxy.endpoint(),
        &[
            ("VISIBILITY_TIMEOUT_SECONDS", "2"),
            ("WORKER_CONCURRENCY", "5"),
        ],
    );
    worker.wait_for_count(" - Done", 5, STEP).await;
    wait_counts(&b.client, &b.queue, "the five to be deleted", (0, 0), STEP).await;
    // Received together, so extended together: one call a second for the five,
    // where one a message would be 25 or more.
    let single = proxy.count("ChangeMessageVisibility");
    let batched = proxy.count("ChangeMessageVisibilityBatch");
    assert_eq!(single, 0, "{:?}", proxy.counts());
    assert!(batched <= 8, "{batched} batch calls: {:?}", proxy.counts());
    assert_eq!(worker.count(" - Received"), 5);
    worker.terminate();
    assert!(worker.wait_exit(STEP).await.success());
}

#[tokio::test]
async fn queue_consumer_mix_a_hung_heartbeat_does_not_delay_the_hand_back() {
    let b = Binary::start("jobs", 4).await;
    let proxy = b.proxy().await;
    // The first extension hangs, however it is sent.
    proxy.fault_times("ChangeMessageVisibility", Fault::Hang, 1);
    proxy.fault_times("ChangeMessageVisibilityBatch", Fault::Hang, 1);
    let mut worker = b.spawn(
        &proxy.endpoint(),
        &[
            ("VISIBILITY_TIMEOUT_SECONDS", "4"),
            ("SHUTDOWN_GRACE_SECONDS", "0"),
        ],
    );
    let id = b.send("60000", None).await;
    worker
        .wait_for_line(&format!("{id} - Working for"), STEP)
        .await;
    wait_for("a heartbeat on its way", STEP, || async {
        (proxy.count("ChangeMessageVisibility") + proxy.count("ChangeMessageVisibilityBatch") >= 1)
            .then_some(())
    })
    .await;
    let signalled = std::time::Instant::now();
    worker.terminate();
    worker
        .wait_for_line(&format!("{id} - Handed back"), STEP)
        .await;
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "handed back {took:?} after the end of the grace period"
    );
    assert!(worker.wait_exit(STEP).await.success());
    assert_eq!(queue_counts(&b.client, &b.queue).await, Some((1, 0)));
}

#[tokio::test]
async fn queue_consumer_mix_done_is_logged_before_the_group_moves_on() {
    let b = Binary::start("jobs.fifo", 30).await;
    let proxy = b.proxy().await;
    // SQS deletes at once (the group moves on), the answer comes 3 s later.
    proxy.fault(
        "DeleteMessageBatch",
        Fault::DelayAnswer(Duration::from_secs(3)),
    );
    let mut worker = b.spawn(
        &proxy.endpoint(),
        &[("WORKER_CONCURRENCY", "2"), ("QUEUE_WAIT_SECONDS", "1")],
    );
    let first = b.send("10", Some("g")).await;
    worker
        .wait_for_line(&format!("{first} - Working for"), STEP)
        .await;
    let second = b.send("20", Some("g")).await;
    worker
        .wait_for_line(&format!("{second} - Working for"), STEP)
        .await;
    worker.wait_for_line(&format!("{first} - Done"), STEP).await;
    let lines = worker.lines();
    let at = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in {lines:#?}"))
    };
    assert!(
        at(&format!("{first} - Done")) < at(&format!("{second} - Working for")),
        "{lines:#?}"
    );
    worker.terminate();
    assert!(worker.wait_exit(STEP).await.success());
}
