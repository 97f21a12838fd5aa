//! The `queue-consumer` binary, driven against moto's SQS and a fake ECS agent that
//! records every protection PUT.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use e2e::agent::{Answer, FakeAgent};
use e2e::counting::{CountingProxy, Fault};
use e2e::moto::{Moto, TcpProxy, aws_env, create_queue_with, queue_counts};
use e2e::process::{Service, run_to_exit};
use e2e::wait_for;

const BIN: &str = "queue-consumer";
const START: Duration = Duration::from_secs(20);
const STEP: Duration = Duration::from_secs(20);

/// moto, a queue on it, and a fake agent.
struct Setup {
    moto: Moto,
    agent: FakeAgent,
    client: Client,
    queue_url: String,
    /// The dead-letter queue, when the queue has a redrive policy.
    dlq_url: Option<String>,
}

impl Setup {
    async fn start(visibility_secs: u32) -> Self {
        let moto = Moto::start().await;
        let agent = FakeAgent::start().await;
        let queue_url = moto.create_queue("jobs", visibility_secs).await;
        let client = moto.client();
        Self {
            moto,
            agent,
            client,
            queue_url,
            dlq_url: None,
        }
    }

    /// A queue whose messages move to a dead-letter queue after `max_receives`.
    async fn with_dlq(visibility_secs: u32, max_receives: u32) -> Self {
        let moto = Moto::start().await;
        let agent = FakeAgent::start().await;
        let client = moto.client();
        let (queue_url, dlq_url) =
            create_queue_with(&client, "jobs", visibility_secs, Some(max_receives)).await;
        Self {
            moto,
            agent,
            client,
            queue_url,
            dlq_url,
        }
    }

    /// A proxy in front of moto that can make chosen SQS operations misbehave.
    async fn sqs_proxy(&self) -> CountingProxy {
        CountingProxy::start(([127, 0, 0, 1], self.moto.port()).into()).await
    }

    /// Messages in the dead-letter queue (visible and in flight).
    async fn dead_letters(&self) -> u64 {
        let Some(dlq) = &self.dlq_url else { return 0 };
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(dlq)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .unwrap_or_else(|e| panic!("dead-letter queue attributes: {e:?}"));
        let attrs = out.attributes.unwrap_or_default();
        [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        ]
        .iter()
        .filter_map(|k| attrs.get(k)?.parse::<u64>().ok())
        .sum()
    }

    /// The worker's environment, with SQS reached at `endpoint`.
    fn env_via(
        &self,
        endpoint: &str,
        extra: &[(&'static str, &str)],
    ) -> Vec<(&'static str, String)> {
        let mut env = aws_env(endpoint);
        env.extend([
            ("COPILOT_QUEUE_URI", self.queue_url.clone()),
            ("ECS_AGENT_URI", self.agent.uri()),
            ("TASK_PROTECTION_BACKEND", "agent".to_owned()),
            ("RUST_LOG", "info".to_owned()),
        ]);
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        env
    }

    fn env(&self, extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
        self.env_via(&self.moto.endpoint(), extra)
    }

    /// Starts the worker and waits for its first long poll.
    async fn worker(&self, extra: &[(&'static str, &str)]) -> Service {
        let worker = Service::spawn(BIN, &[], &self.env(extra));
        worker
            .wait_for_line("Long polling for messages", START)
            .await;
        worker
    }

    /// Sends `bodies`; returns their message ids in order.
    async fn send(&self, bodies: &[&str]) -> Vec<String> {
        let mut ids = Vec::new();
        for body in bodies {
            ids.push(e2e::moto::send(&self.client, &self.queue_url, body).await);
        }
        ids
    }

    /// (visible, in flight) message counts.
    async fn counts(&self) -> Option<(u64, u64)> {
        queue_counts(&self.client, &self.queue_url).await
    }

    async fn wait_counts(&self, what: &str, want: (u64, u64)) {
        wait_for(what, STEP, || async {
            (self.counts().await == Some(want)).then_some(())
        })
        .await;
    }

    /// Receives what is visible now, without waiting: (message id, receive count).
    async fn receive_now(&self) -> Vec<(String, u32)> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(0)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .unwrap_or_else(|e| panic!("receive: {e:?}"));
        out.messages
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                let count = m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                (m.message_id.unwrap_or_default(), count)
            })
            .collect()
    }
}

/// Sends SIGTERM and expects exit 0 within `within`.
async fn stop(worker: &mut Service, within: Duration) {
    worker.terminate();
    let status = worker.wait_exit(within).await;
    assert!(status.success(), "exit status {status:?}");
}

/// The highest number of jobs between "Working" and "Done" at once, from the log.
fn most_running(lines: &[String]) -> usize {
    let mut running = 0usize;
    let mut most = 0;
    for line in lines {
        if line.contains(" - Working for ") {
            running += 1;
            most = most.max(running);
        } else if line.contains(" - Done") {
            running = running.saturating_sub(1);
        }
    }
    most
}

#[tokio::test]
async fn queue_consumer_happy_path_deletes_every_message() {
    let s = Setup::start(30).await;
    let mut worker = s.worker(&[]).await;
    let ids = s.send(&["100", "0", "250", "50", "10"]).await;
    worker.wait_for_count(" - Done", ids.len(), STEP).await;
    for id in &ids {
        for step in ["Received", "Working for", "Done"] {
            assert_eq!(worker.count(&format!("{id} - {step}")), 1, "{id} {step}");
        }
    }
    assert_eq!(
        worker.count(&format!("{} - Working for 250 milliseconds", ids[2])),
        1
    );
    s.wait_counts("the queue to be empty", (0, 0)).await;
    // Protected while working, released once idle.
    let puts = s.agent.puts();
    assert!(puts.first().is_some_and(|p| p.enabled()), "{puts:?}");
    wait_for("protection to be released", STEP, || async {
        s.agent.released().then_some(())
    })
    .await;
    worker.wait_for_line("Task protection acquired", STEP).await;
    worker.wait_for_line("Task protection released", STEP).await;
    stop(&mut worker, STEP).await;
    assert!(worker.count("Received SIGTERM signal, will quit when all work is done") == 1);
}

#[tokio::test]
async fn queue_consumer_concurrency_overlaps_jobs_up_to_the_limit() {
    let s = Setup::start(30).await;
    let ids = s.send(&["1500"; 6]).await;
    let mut worker = s.worker(&[("WORKER_CONCURRENCY", "3")]).await;
    // Three jobs run at once: the third starts before any is done.
    worker.wait_for_count(" - Working for", 3, STEP).await;
    assert_eq!(worker.count(" - Done"), 0, "jobs did not overlap");
    worker.wait_for_count(" - Done", ids.len(), STEP).await;
    assert_eq!(most_running(&worker.lines()), 3);
    // No receive asked for more than the free slots, so nothing waited unworked.
    assert_eq!(worker.count(" - Received"), ids.len());
    s.wait_counts("the queue to be empty", (0, 0)).await;
    stop(&mut worker, STEP).await;
}

#[tokio::test]
async fn queue_consumer_bad_bodies_are_kept_for_the_dead_letter_queue() {
    // A 1 s visibility: a bad message that was merely left alone would be back at once.
    let s = Setup::start(1).await;
    let huge = "9".repeat(100_000);
    let bad = s.send(&["abc", "-5", " ", "1e9", &huge, "3600001"]).await;
    let good = s.send(&["20", "30"]).await;
    let mut worker = s
        .worker(&[
            ("VISIBILITY_TIMEOUT_SECONDS", "1"),
            ("WORKER_CONCURRENCY", "4"),
        ])
        .await;
    worker.wait_for_count(" - Done", good.len(), STEP).await;
    for id in &bad {
        let line = worker
            .wait_for_line(&format!("{id} - Rejected: "), STEP)
            .await;
        assert!(line.contains("ERROR"), "{line}");
        assert!(line.contains("visible again in 30s"), "{line}");
        assert_eq!(worker.count(&format!("{id} - Working")), 0);
    }
    assert!(
        worker
            .lines()
            .iter()
            .any(|l| l.contains("is not a whole number of milliseconds") && l.contains("\"abc\""))
    );
    assert!(worker.lines().iter().any(|l| l.contains("(100000 digits)")));
    // Not deleted: all six are in flight, pushed out well past their 1 s visibility.
    s.wait_counts("bad messages to stay in flight", (0, 6))
        .await;
    let seen = worker.count(" - Received");
    // The worker goes on: a new good job is done while the bad ones stay out.
    let late = s.send(&["10"]).await;
    worker
        .wait_for_line(&format!("{} - Done", late[0]), STEP)
        .await;
    s.wait_counts("the good one deleted", (0, 6)).await;
    assert_eq!(
        worker.count(" - Received"),
        seen + 1,
        "a bad message came back"
    );
    stop(&mut worker, STEP).await;
}

#[tokio::test]
async fn queue_consumer_job_longer_than_the_visibility_timeout_is_delivered_once() {
    let s = Setup::start(2).await;
    let mut worker = s
        .worker(&[
            ("VISIBILITY_TIMEOUT_SECONDS", "2"),
            ("WORKER_CONCURRENCY", "2"),
        ])
        .await;
    let ids = s.send(&["7000"]).await;
    let id = &ids[0];
    let done = format!("{id} - Done");
    worker.wait_for_line(&done, Duration::from_secs(30)).await;
    // A second slot was free all along: had the visibility lapsed, it would have been
    // received again.
    assert_eq!(worker.count(&format!("{id} - Received")), 1);
    let received = worker
        .wait_for_line(&format!("{id} - Received"), STEP)
        .await;
    assert!(received.contains("receive_count=1"), "{received}");
    s.wait_counts("the queue to be empty", (0, 0)).await;
    stop(&mut worker, STEP).await;
}

#[tokio::test]
async fn queue_consumer_recovers_from_an_sqs_outage_without_losing_messages() {
    let s = Setup::start(30).await;
    let upstream = ([127, 0, 0, 1], s.moto.port()).into();
    let proxy = TcpProxy::start(upstream).await;
    let env = s.env_via(
        &proxy.endpoint(),
        &[("WORKER_CONCURRENCY", "2"), ("QUEUE_WAIT_SECONDS", "1")],
    );
    let mut ids = s.send(&["300"; 2]).await;
    let mut worker = Service::spawn(BIN, &[], &env);
    worker.wait_for_count(" - Done", 2, START).await;
    s.wait_counts("the first two deleted", (0, 0)).await;
    proxy.cut();
    // The rest arrive during the outage.
    ids.extend(s.send(&["300"; 8]).await);
    worker
        .wait_for_line("Receiving messages failed", STEP)
        .await;
    // The outage itself: ten seconds of refused connections.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let failures = worker.count("Receiving messages failed");
    proxy.restore().await;
    worker
        .wait_for_count(" - Done", ids.len(), Duration::from_secs(60))
        .await;
    for id in &ids {
        assert!(worker.count(&format!("{id} - Done")) >= 1, "{id} lost");
    }
    // Backoff, not a hot loop: 250 ms doubling gives about six tries in ten seconds.
    assert!((1..=10).contains(&failures), "{failures} failed receives");
    s.wait_counts("the queue to be empty", (0, 0)).await;
    stop(&mut worker, STEP).await;
}

#[tokio::test]
async fn queue_consumer_protection_refused_hands_the_message_back_and_exits() {
    let s = Setup::start(30).await;
    s.agent.always(Answer::Failure("DEPLOYMENT_BLOCKED"));
    let mut worker = s.worker(&[]).await;
    let ids = s.send(&["100"]).await;
    let status = worker.wait_exit(STEP).await;
    assert!(status.success(), "exit status {status:?}");
    assert_eq!(
        worker.count(" - Working for"),
        0,
        "the job started unprotected"
    );
    assert_eq!(worker.count(&format!("{} - Handed back", ids[0])), 1);
    assert!(worker.count("DEPLOYMENT_BLOCKED") >= 1);
    // Outside ECS the drain is off (one line says so), so a refusal means the task
    // is being replaced.
    assert_eq!(
        worker.count("Drain is off: ECS_CONTAINER_METADATA_URI_V4 is not set"),
        1
    );
    // Visible again at once, for another task.
    let got = s.receive_now().await;
    assert_eq!(got, vec![(ids[0].clone(), 2)]);
}

#[tokio::test]
async fn queue_consumer_sigterm_mid_job_finishes_and_deletes_it() {
    let s = Setup::start(30).await;
    let mut worker = s.worker(&[]).await;
    let ids = s.send(&["3000"]).await;
    let id = &ids[0];
    worker
        .wait_for_line(&format!("{id} - Working for 3000"), STEP)
        .await;
    let started = std::time::Instant::now();
    worker.terminate();
    worker
        .wait_for_line(
            "Received SIGTERM signal, will quit when all work is done",
            STEP,
        )
        .await;
    let status = worker.wait_exit(Duration::from_secs(25)).await;
    assert!(status.success(), "exit status {status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(worker.count(&format!("{id} - Done")), 1);
    // No new long poll after the signal.
    let lines = worker.lines();
    let signal_at = lines
        .iter()
        .position(|l| l.contains("Received SIGTERM signal"))
        .unwrap();
    assert!(
        !lines[signal_at..]
            .iter()
            .any(|l| l.contains("Long polling"))
    );
    assert_eq!(s.counts().await, Some((0, 0)));
    assert!(s.agent.released(), "{:?}", s.agent.puts());
}

#[tokio::test]
async fn queue_consumer_sigterm_past_the_grace_period_hands_the_job_back() {
    let s = Setup::start(30).await;
    let mut worker = s.worker(&[("SHUTDOWN_GRACE_SECONDS", "1")]).await;
    let ids = s.send(&["60000"]).await;
    let id = &ids[0];
    worker
        .wait_for_line(&format!("{id} - Working for 60000"), STEP)
        .await;
    stop(&mut worker, Duration::from_secs(10)).await;
    assert_eq!(worker.count(&format!("{id} - Handed back")), 1);
    assert_eq!(worker.count(&format!("{id} - Done")), 0);
    // Visible again at once, not after the 30 s visibility timeout.
    assert_eq!(s.receive_now().await, vec![(id.clone(), 2)]);
    assert!(s.agent.released(), "{:?}", s.agent.puts());
}

#[tokio::test]
async fn queue_consumer_idle_for_a_minute_makes_one_protection_call_at_start() {
    let s = Setup::start(30).await;
    let mut worker = s.worker(&[("QUEUE_WAIT_SECONDS", "20")]).await;
    // About absence: nothing to wait for but the time itself.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(worker.count("Long polling for messages") >= 3);
    // The release of what an earlier process in the task may have left, once the
    // maintain window (6 s) of the start has passed; nothing after.
    let puts = s.agent.puts();
    assert_eq!(puts.len(), 1, "{puts:?}");
    assert!(!puts[0].enabled());
    assert_eq!(s.agent.all_requests().await, 1);
    stop(&mut worker, STEP).await;
    assert_eq!(s.agent.all_requests().await, 1);
}

#[tokio::test]
async fn queue_consumer_bad_config_exits_2_with_one_line() {
    let base: HashMap<&str, String> = aws_env("http://127.0.0.1:9").into_iter().collect();
    let with = |extra: &[(&'static str, &str)]| {
        let mut env: Vec<(&str, String)> = base.iter().map(|(k, v)| (*k, v.clone())).collect();
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        env
    };
    let url = "http://127.0.0.1:9/123456789012/jobs";
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
    let busy_port = busy
        .local_addr()
        .map(|a| a.port().to_string())
        .unwrap_or_default();
    let cases: Vec<(Vec<(&str, String)>, &str)> = vec![
        (with(&[]), "COPILOT_QUEUE_URI"),
        (
            with(&[("COPILOT_QUEUE_URI", "not a url")]),
            "COPILOT_QUEUE_URI",
        ),
        (
            with(&[("COPILOT_QUEUE_URI", url), ("WORKER_CONCURRENCY", "0")]),
            "WORKER_CONCURRENCY=0 is out of range",
        ),
        (
            with(&[("COPILOT_QUEUE_URI", url), ("QUEUE_WAIT_SECONDS", "abc")]),
            "QUEUE_WAIT_SECONDS",
        ),
        (
            with(&[
                ("COPILOT_QUEUE_URI", url),
                ("VISIBILITY_TIMEOUT_SECONDS", "43201"),
            ]),
            "VISIBILITY_TIMEOUT_SECONDS",
        ),
        (
            with(&[
                ("COPILOT_QUEUE_URI", url),
                ("PROTECTION_DURATION_MINUTES", "0"),
            ]),
            "PROTECTION_DURATION_MINUTES",
        ),
        (
            with(&[("COPILOT_QUEUE_URI", url), ("LOG_FORMAT", "xml")]),
            "xml",
        ),
        (
            // SQS keeps a message in flight at most 12 h from its receipt.
            with(&[("COPILOT_QUEUE_URI", url), ("MAX_JOB_MS", "43200000")]),
            "MAX_JOB_MS=43200000 is out of range: allowed 0..=42300000",
        ),
        (
            with(&[
                ("COPILOT_QUEUE_URI", url),
                ("TASK_PROTECTION_BACKEND", "agent"),
            ]),
            "ECS_AGENT_URI",
        ),
        (
            with(&[("COPILOT_QUEUE_URI", url), ("JOB_TIMEOUT_SECONDS", "0")]),
            "JOB_TIMEOUT_SECONDS=0 is out of range: allowed 1..=42300 seconds",
        ),
        (
            with(&[("COPILOT_QUEUE_URI", url), ("HEALTH_PORT", "70000")]),
            "HEALTH_PORT=70000 is out of range",
        ),
        (
            with(&[("COPILOT_QUEUE_URI", url), ("QUEUE_WEIGHTS", "default")]),
            "QUEUE_WEIGHTS=\"default\" is not valid",
        ),
        (
            with(&[("COPILOT_QUEUE_URI", url), ("QUEUE_WEIGHTS", "typo=2")]),
            "QUEUE_WEIGHTS names \"typo\", which is not one of the queues: default",
        ),
        (
            with(&[("COPILOT_QUEUE_URI", url), ("HEALTH_PORT", &busy_port)]),
            "(HEALTH_PORT)",
        ),
        (
            // The agent endpoint is plain http; the client has no TLS.
            with(&[
                ("COPILOT_QUEUE_URI", url),
                ("ECS_AGENT_URI", "https://169.254.170.2/api/0123"),
            ]),
            "ECS_AGENT_URI=\"https://169.254.170.2/api/0123\" is not valid: https is not supported",
        ),
    ];
    for (env, needle) in cases {
        let (status, stdout, stderr) = run_to_exit(BIN, &[], &env).await;
        assert_eq!(status.code(), Some(2), "{needle}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{needle}: {stderr:?}");
        assert!(stderr.starts_with("queue-consumer: error: "), "{stderr}");
        assert!(stderr.contains(needle), "{needle}: {stderr}");
        assert!(stdout.is_empty(), "{needle}: {stdout}");
    }
    let (status, stdout, _) = run_to_exit(BIN, &["--help"], &[]).await;
    assert!(status.success());
    for var in [
        "COPILOT_QUEUE_URI",
        "QUEUE_REGION",
        "WORKER_CONCURRENCY",
        "QUEUE_WAIT_SECONDS",
        "VISIBILITY_TIMEOUT_SECONDS",
        "MAX_JOB_MS",
        "SHUTDOWN_GRACE_SECONDS",
        "LOG_FORMAT",
        "PROTECTION_DURATION_MINUTES",
        "PROTECTION_MAINTAIN_PERCENT",
        "PROTECTION_REFRESH_PERCENT",
        "PROTECTION_CHECK_INTERVAL_MS",
        "JOB_TIMEOUT_SECONDS",
        "QUEUE_WEIGHTS",
        "HEALTH_PORT",
    ] {
        assert!(
            stdout.contains(&format!("[env: {var}=")),
            "{var} missing from --help"
        );
    }
}

// ---- SQS and the agent misbehaving -------------------------------------------------

/// How many times the job of message `id` started.
fn runs(worker: &Service, id: &str) -> usize {
    worker.count(&format!("{id} - Working for"))
}

/// Sends SIGTERM and returns how long the worker took to exit 0.
async fn time_to_exit(worker: &mut Service, within: Duration) -> Duration {
    let started = std::time::Instant::now();
    worker.terminate();
    let status = worker.wait_exit(within).await;
    assert!(status.success(), "exit status {status:?}");
    let took = started.elapsed();
    eprintln!("SIGTERM to exit: {took:?}");
    took
}

#[tokio::test]
async fn queue_consumer_unanswered_delete_neither_stalls_nor_outlasts_the_shutdown_budget() {
    let s = Setup::start(30).await;
    let proxy = s.sqs_proxy().await;
    proxy.fault("DeleteMessageBatch", Fault::Hang);
    let env = s.env_via(
        &proxy.endpoint(),
        &[("SHUTDOWN_GRACE_SECONDS", "2"), ("WORKER_CONCURRENCY", "2")],
    );
    let mut worker = Service::spawn(BIN, &[], &env);
    let ids = s.send(&["100"]).await;
    worker
        .wait_for_line(&format!("{} - Working for", ids[0]), START)
        .await;
    // The delete gets no answer: the worker says it does not know what happened,
    // and on which queue.
    let line = worker.wait_for_line("outcome unknown", STEP).await;
    assert!(line.contains(&s.queue_url), "{line}");
    // The other slot still receives and works.
    let more = s.send(&["50"]).await;
    worker
        .wait_for_line(&format!("{} - Working for", more[0]), STEP)
        .await;
    // Shutdown holds its budget whatever SQS does: grace, last settles, release.
    let took = time_to_exit(&mut worker, Duration::from_secs(30)).await;
    assert!(
        took < Duration::from_secs(9),
        "{took:?} from SIGTERM to exit"
    );
    assert_eq!(runs(&worker, &ids[0]), 1);
    assert_eq!(runs(&worker, &more[0]), 1);
    // Never deleted, never handed back (the job is done): in flight until it lapses.
    assert_eq!(s.counts().await, Some((0, 2)));
    assert!(s.agent.released(), "{:?}", s.agent.puts());
}

#[tokio::test]
async fn queue_consumer_black_holed_long_poll_times_out_and_recovers() {
    let s = Setup::start(30).await;
    let proxy = s.sqs_proxy().await;
    proxy.fault("ReceiveMessage", Fault::Hang);
    let env = s.env_via(&proxy.endpoint(), &[("QUEUE_WAIT_SECONDS", "1")]);
    let mut worker = Service::spawn(BIN, &[], &env);
    let line = worker
        .wait_for_line("Receiving messages failed", STEP)
        .await;
    assert!(line.contains("timed out"), "{line}");
    proxy.clear("ReceiveMessage");
    let ids = s.send(&["10"]).await;
    worker
        .wait_for_line(&format!("{} - Done", ids[0]), STEP)
        .await;
    s.wait_counts("the queue to be empty", (0, 0)).await;
    let took = time_to_exit(&mut worker, STEP).await;
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn queue_consumer_agent_outage_spends_no_receive_count() {
    let s = Setup::with_dlq(2, 2).await;
    let agent_proxy = TcpProxy::start(s.agent.address()).await;
    agent_proxy.cut();
    let agent_uri = FakeAgent::uri_via(&agent_proxy.endpoint());
    let mut worker = s
        .worker(&[
            ("ECS_AGENT_URI", &agent_uri),
            ("VISIBILITY_TIMEOUT_SECONDS", "2"),
            ("WORKER_CONCURRENCY", "2"),
            ("QUEUE_WAIT_SECONDS", "1"),
            ("PROTECTION_ACQUIRE_TIMEOUT_MS", "1000"),
            ("PROTECTION_REQUEST_TIMEOUT_MS", "1000"),
            ("PROTECTION_CHECK_INTERVAL_MS", "1000"),
        ])
        .await;
    let ids = s.send(&["100"]).await;
    // Three acquire timeouts: well past the 2 s visibility, and past two receives'
    // worth of hand-backs.
    worker
        .wait_for_count(
            &format!("{} - Still waiting for task protection", ids[0]),
            3,
            STEP,
        )
        .await;
    // A second message is not taken while protection does not work.
    let later = s.send(&["100"]).await;
    worker
        .wait_for_count(
            &format!("{} - Still waiting for task protection", ids[0]),
            5,
            STEP,
        )
        .await;
    assert_eq!(
        worker.count(" - Received"),
        1,
        "received more while unprotected"
    );
    assert_eq!(runs(&worker, &ids[0]), 0, "worked without protection");
    assert_eq!(s.dead_letters().await, 0);
    agent_proxy.restore().await;
    for id in ids.iter().chain(&later) {
        worker
            .wait_for_line(&format!("{id} - Done"), Duration::from_secs(30))
            .await;
        assert_eq!(runs(&worker, id), 1, "{id}");
        let received = worker
            .wait_for_line(&format!("{id} - Received"), STEP)
            .await;
        assert!(received.contains("receive_count=1"), "{received}");
    }
    s.wait_counts("the queue to be empty", (0, 0)).await;
    assert_eq!(s.dead_letters().await, 0);
    let took = time_to_exit(&mut worker, STEP).await;
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn queue_consumer_failing_deletes_neither_redo_jobs_nor_block_other_slots() {
    let s = Setup::start(2).await;
    let proxy = s.sqs_proxy().await;
    let env = s.env_via(
        &proxy.endpoint(),
        &[
            ("VISIBILITY_TIMEOUT_SECONDS", "2"),
            ("WORKER_CONCURRENCY", "4"),
            ("QUEUE_WAIT_SECONDS", "1"),
        ],
    );
    let mut worker = Service::spawn(BIN, &[], &env);
    worker
        .wait_for_line("Long polling for messages", START)
        .await;
    proxy.fault("DeleteMessageBatch", Fault::server_error());
    let ids = s.send(&["100", "100", "100"]).await;
    // Deletes fail for three visibility timeouts and more.
    wait_for("a failing delete", STEP, || async {
        (proxy.count("DeleteMessageBatch") >= 1).then_some(())
    })
    .await;
    let failing_since = std::time::Instant::now();
    let failed = proxy.count("DeleteMessageBatch");
    wait_for(
        "deletes failing for three visibility timeouts",
        STEP,
        || async {
            (failing_since.elapsed() >= Duration::from_secs(6)
                && proxy.count("DeleteMessageBatch") > failed)
                .then_some(())
        },
    )
    .await;
    // Meanwhile another job is received into the free slot and done once SQS works.
    proxy.clear("DeleteMessageBatch");
    for id in &ids {
        worker.wait_for_line(&format!("{id} - Done"), STEP).await;
        assert_eq!(runs(&worker, id), 1, "{id} worked more than once");
        assert_eq!(worker.count(&format!("{id} - Received")), 1, "{id}");
    }
    s.wait_counts("the queue to be empty", (0, 0)).await;
    // One delete that hangs holds back no other message's delete.
    let before = proxy.count("DeleteMessageBatch");
    proxy.fault_times("DeleteMessageBatch", Fault::Hang, 1);
    let first = s.send(&["10"]).await;
    worker
        .wait_for_line(&format!("{} - Working for", first[0]), STEP)
        .await;
    wait_for("the hung delete", STEP, || async {
        (proxy.count("DeleteMessageBatch") > before).then_some(())
    })
    .await;
    let second = s.send(&["10"]).await;
    worker
        .wait_for_line(&format!("{} - Done", second[0]), Duration::from_secs(3))
        .await;
    worker
        .wait_for_line(&format!("{} - Done", first[0]), STEP)
        .await;
    for id in [&first[0], &second[0]] {
        assert_eq!(runs(&worker, id), 1, "{id} worked more than once");
        assert_eq!(worker.count(&format!("{id} - Received")), 1, "{id}");
    }
    s.wait_counts("the queue to be empty", (0, 0)).await;
    stop(&mut worker, STEP).await;
}

#[tokio::test]
async fn queue_consumer_purged_message_stops_its_heartbeat_and_its_job() {
    let s = Setup::start(2).await;
    let proxy = s.sqs_proxy().await;
    let env = s.env_via(&proxy.endpoint(), &[("VISIBILITY_TIMEOUT_SECONDS", "2")]);
    let mut worker = Service::spawn(BIN, &[], &env);
    let ids = s.send(&["8000"]).await;
    let id = &ids[0];
    worker
        .wait_for_line(&format!("{id} - Working for"), START)
        .await;
    s.client
        .purge_queue()
        .queue_url(&s.queue_url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("purge: {e:?}"));
    let line = worker
        .wait_for_line(&format!("{id} - No longer held"), STEP)
        .await;
    assert!(line.contains("ChangeMessageVisibility"), "{line}");
    worker.wait_for_line(&format!("{id} - Stopped"), STEP).await;
    // Said once, asked once or twice, never again.
    assert_eq!(worker.count(&format!("{id} - No longer held")), 1);
    assert!(
        proxy.count("ChangeMessageVisibilityBatch") <= 2,
        "{:?}",
        proxy.counts()
    );
    assert_eq!(worker.count(&format!("{id} - Done")), 0);
    assert_eq!(worker.count("Extending visibility failed"), 0);
    let took = time_to_exit(&mut worker, STEP).await;
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(s.agent.released(), "{:?}", s.agent.puts());
}

#[tokio::test]
async fn queue_consumer_change_visibility_denied_is_said_once_and_not_retried() {
    let s = Setup::start(3).await;
    let proxy = s.sqs_proxy().await;
    proxy.fault(
        "ChangeMessageVisibilityBatch",
        Fault::access_denied("sqs:changemessagevisibility"),
    );
    let env = s.env_via(&proxy.endpoint(), &[("VISIBILITY_TIMEOUT_SECONDS", "3")]);
    let mut worker = Service::spawn(BIN, &[], &env);
    let ids = s.send(&["2500"]).await;
    worker
        .wait_for_line(&format!("{} - Done", ids[0]), START)
        .await;
    // Within the minute neither a heartbeat nor a hand-back is sent.
    let more = s.send(&["2500"]).await;
    worker
        .wait_for_line(&format!("{} - Done", more[0]), STEP)
        .await;
    let bad = s.send(&["abc"]).await;
    worker
        .wait_for_line(&format!("{} - Hand-back failed", bad[0]), STEP)
        .await;
    let denied: Vec<String> = worker
        .lines()
        .into_iter()
        .filter(|l| l.contains("sqs:ChangeMessageVisibility"))
        .collect();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(denied[0].contains("ERROR"), "{}", denied[0]);
    assert!(denied[0].contains("task role"), "{}", denied[0]);
    // One call, then none for a minute.
    assert_eq!(
        proxy.count("ChangeMessageVisibilityBatch"),
        1,
        "{:?}",
        proxy.counts()
    );
    assert_eq!(runs(&worker, &ids[0]), 1);
    // The two jobs are deleted; the bad body stays in flight until it lapses.
    s.wait_counts("only the bad message left", (0, 1)).await;
    stop(&mut worker, STEP).await;
}

/// Runs the worker against a queue it cannot use; returns its status, the time it
/// took, and its stderr.
async fn exits_on_a_permanent_receive_error(
    env: &[(&str, String)],
) -> (std::process::ExitStatus, Duration, Vec<String>) {
    let started = std::time::Instant::now();
    let mut worker = Service::spawn(BIN, &[], env);
    let status = worker.wait_exit(Duration::from_secs(30)).await;
    let errors = worker
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("queue-consumer: error: "))
        .collect();
    (status, started.elapsed(), errors)
}

#[tokio::test]
async fn queue_consumer_permanent_receive_errors_exit_non_zero() {
    let s = Setup::start(30).await;
    // A queue that does not exist.
    let mut env = s.env(&[]);
    env.push((
        "COPILOT_QUEUE_URI",
        format!("{}/123456789012/missing", s.moto.endpoint()),
    ));
    let (status, took, errors) = exits_on_a_permanent_receive_error(&env).await;
    assert_eq!(status.code(), Some(1), "{errors:?}");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("queue does not exist"), "{errors:?}");
    assert!(errors[0].contains("COPILOT_QUEUE_URI"), "{errors:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    // The task role may not receive.
    let proxy = s.sqs_proxy().await;
    proxy.fault("ReceiveMessage", Fault::access_denied("sqs:receivemessage"));
    let (status, _, errors) =
        exits_on_a_permanent_receive_error(&s.env_via(&proxy.endpoint(), &[])).await;
    assert_eq!(status.code(), Some(1), "{errors:?}");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("sqs:ReceiveMessage"), "{errors:?}");
    let tries = proxy.count("ReceiveMessage");
    assert!((2..=6).contains(&tries), "{tries} tries");
    // Credentials SQS does not know.
    proxy.fault(
        "ReceiveMessage",
        Fault::Error {
            status: 403,
            code: "InvalidClientTokenId",
            message: "The security token included in the request is invalid.".to_owned(),
        },
    );
    let (status, _, errors) =
        exits_on_a_permanent_receive_error(&s.env_via(&proxy.endpoint(), &[])).await;
    assert_eq!(status.code(), Some(1), "{errors:?}");
    assert!(errors[0].contains("InvalidClientTokenId"), "{errors:?}");
    // No credentials at all.
    let no_creds: Vec<(&str, String)> = s
        .env(&[])
        .into_iter()
        .filter(|(k, _)| !k.starts_with("AWS_ACCESS_KEY_ID") && !k.starts_with("AWS_SECRET"))
        .collect();
    let (status, _, errors) = exits_on_a_permanent_receive_error(&no_creds).await;
    assert_eq!(status.code(), Some(1), "{errors:?}");
    assert!(
        errors[0].to_lowercase().contains("credentials"),
        "{errors:?}"
    );
}

#[tokio::test]
async fn queue_consumer_queue_url_region_wins_over_aws_region() {
    let s = Setup::start(30).await;
    // The queue exists only in eu-west-1; the task runs with AWS_REGION=us-east-1.
    let creds = aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "e2e");
    let eu = aws_sdk_sqs::Client::from_conf(
        aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("eu-west-1"))
            .credentials_provider(creds)
            .endpoint_url(s.moto.endpoint())
            .build(),
    );
    eu.create_queue()
        .queue_name("eu-jobs")
        .send()
        .await
        .unwrap_or_else(|e| panic!("create: {e:?}"));
    let url = "https://sqs.eu-west-1.amazonaws.com/123456789012/eu-jobs";
    eu.send_message()
        .queue_url(url)
        .message_body("10")
        .send()
        .await
        .unwrap_or_else(|e| panic!("send: {e:?}"));
    let mut env = s.env(&[]);
    env.push(("COPILOT_QUEUE_URI", url.to_owned()));
    let mut worker = Service::spawn(BIN, &[], &env);
    worker.wait_for_line(" - Done", START).await;
    stop(&mut worker, STEP).await;
}

#[tokio::test]
async fn queue_consumer_heartbeat_in_flight_lands_before_the_hand_back() {
    let s = Setup::start(4).await;
    let proxy = s.sqs_proxy().await;
    // Every visibility change reaches SQS 2 s late: the heartbeat is still on its way
    // when the hand-back is sent, and lands first.
    proxy.fault(
        "ChangeMessageVisibilityBatch",
        Fault::Delay(Duration::from_secs(2)),
    );
    let env = s.env_via(
        &proxy.endpoint(),
        &[
            ("VISIBILITY_TIMEOUT_SECONDS", "4"),
            ("SHUTDOWN_GRACE_SECONDS", "0"),
        ],
    );
    let mut worker = Service::spawn(BIN, &[], &env);
    let ids = s.send(&["60000"]).await;
    worker
        .wait_for_line(&format!("{} - Working for", ids[0]), START)
        .await;
    wait_for("a heartbeat in flight", STEP, || async {
        (proxy.count("ChangeMessageVisibilityBatch") >= 1).then_some(())
    })
    .await;
    let took = time_to_exit(&mut worker, STEP).await;
    assert!(took < Duration::from_secs(8), "{took:?}");
    wait_for("every change to reach SQS", STEP, || async {
        (proxy.forwarded("ChangeMessageVisibilityBatch")
            >= proxy.count("ChangeMessageVisibilityBatch"))
        .then_some(())
    })
    .await;
    // Handed back after the heartbeat landed: visible now.
    assert_eq!(s.counts().await, Some((1, 0)));
    assert_eq!(worker.count(&format!("{} - Handed back", ids[0])), 1);
}

#[tokio::test]
async fn queue_consumer_sigterm_during_a_long_poll_hands_its_messages_straight_back() {
    let s = Setup::start(30).await;
    let proxy = s.sqs_proxy().await;
    let ids = s.send(&["10", "10"]).await;
    // The receive reaches SQS 1 s late, its answer with both messages after SIGTERM.
    proxy.fault("ReceiveMessage", Fault::Delay(Duration::from_secs(1)));
    let env = s.env_via(&proxy.endpoint(), &[("WORKER_CONCURRENCY", "2")]);
    let mut worker = Service::spawn(BIN, &[], &env);
    worker
        .wait_for_line("Long polling for messages", START)
        .await;
    wait_for("a receive on its way", STEP, || async {
        (proxy.count("ReceiveMessage") >= 1).then_some(())
    })
    .await;
    let took = time_to_exit(&mut worker, STEP).await;
    assert!(took < Duration::from_secs(8), "{took:?}");
    wait_for("the receive to reach SQS", STEP, || async {
        (proxy.forwarded("ReceiveMessage") >= 1).then_some(())
    })
    .await;
    // Visible again at once, not after the 30 s visibility timeout; not worked.
    assert_eq!(s.counts().await, Some((2, 0)));
    for id in &ids {
        assert_eq!(runs(&worker, id), 0);
    }
}

#[tokio::test]
async fn queue_consumer_second_signal_ends_the_grace_period_at_once() {
    let s = Setup::start(30).await;
    let mut worker = s.worker(&[("SHUTDOWN_GRACE_SECONDS", "600")]).await;
    let ids = s.send(&["600000"]).await;
    let id = &ids[0];
    worker
        .wait_for_line(&format!("{id} - Working for"), STEP)
        .await;
    worker.terminate();
    worker
        .wait_for_line(
            "Received SIGTERM signal, will quit when all work is done",
            STEP,
        )
        .await;
    let took = time_to_exit(&mut worker, Duration::from_secs(10)).await;
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(worker.count(&format!("{id} - Handed back")), 1);
    assert_eq!(s.receive_now().await, vec![(id.clone(), 2)]);
    assert!(s.agent.released(), "{:?}", s.agent.puts());
}

#[tokio::test]
async fn queue_consumer_short_jobs_cost_about_a_fifth_of_a_request_each() {
    // Ten slots and jobs that end at once: a receive of ten, then one delete batch
    // for the ten. Slots that free up together are asked for together.
    const JOBS: usize = 100;
    let s = Setup::start(30).await;
    s.send(&["0"; JOBS]).await;
    let proxy = s.sqs_proxy().await;
    let mut worker = Service::spawn(
        BIN,
        &[],
        &s.env_via(&proxy.endpoint(), &[("WORKER_CONCURRENCY", "10")]),
    );
    worker.wait_for_count(" - Done", JOBS, STEP * 3).await;
    let (receives, deletes) = (
        proxy.count("ReceiveMessage"),
        proxy.count("DeleteMessageBatch"),
    );
    // 0.2 a job at best (20 requests); one more receive may be on its way already.
    assert!(
        receives + deletes <= 30,
        "{receives} receives and {deletes} delete batches for {JOBS} jobs: {:?}",
        proxy.counts()
    );
    s.wait_counts("the queue to be empty", (0, 0)).await;
    stop(&mut worker, STEP).await;
}

#[tokio::test]
async fn queue_consumer_health_endpoint_and_healthcheck_subcommand() {
    let s = Setup::start(30).await;
    let proxy = s.sqs_proxy().await;
    let port = e2e::free_port().to_string();
    let env = s.env_via(
        &proxy.endpoint(),
        &[("HEALTH_PORT", &port), ("QUEUE_WAIT_SECONDS", "1")],
    );
    let mut worker = Service::spawn(BIN, &[], &env);
    worker.wait_for_line("Health endpoint on", START).await;
    worker
        .wait_for_line("Long polling for messages", START)
        .await;
    let healthz = format!("http://127.0.0.1:{port}/healthz");
    let check = [("HEALTH_PORT", port.clone())];
    // Idle and receiving: healthy, without any of the worker's other settings.
    let (status, stdout, stderr) = run_to_exit(BIN, &["healthcheck"], &check).await;
    assert!(status.success(), "{stdout} {stderr}");
    assert_eq!(stdout.trim(), "healthy");
    // The role may not receive: unhealthy at once, with the reason, until it exits.
    proxy.fault("ReceiveMessage", Fault::access_denied("sqs:receivemessage"));
    let reason = wait_for("/healthz to answer 503", STEP, || async {
        let answer = reqwest::get(&healthz).await.ok()?;
        (answer.status() == 503).then_some(answer.text().await.ok()?)
    })
    .await;
    assert!(
        reason.starts_with("receiving from ") && reason.contains("AccessDenied"),
        "{reason}"
    );
    assert_eq!(reason.trim().lines().count(), 1, "{reason}");
    let status = worker.wait_exit(STEP).await;
    assert_eq!(status.code(), Some(1));
    // Nobody there: unhealthy too, saying why.
    let (status, _, stderr) = run_to_exit(BIN, &["healthcheck"], &check).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.starts_with("queue-consumer: unhealthy: cannot reach"),
        "{stderr}"
    );
}
