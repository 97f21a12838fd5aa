//! The `queue-consumer` binary, driven against moto's SQS and a fake ECS agent that
//! records every protection PUT.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{MessageSystemAttributeName, QueueAttributeName};
use e2e::agent::{Answer, FakeAgent};
use e2e::moto::{Moto, TcpProxy, aws_env};
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
        }
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
            let out = self
                .client
                .send_message()
                .queue_url(&self.queue_url)
                .message_body(*body)
                .send()
                .await
                .unwrap_or_else(|e| panic!("send {body:.20}: {e:?}"));
            ids.push(out.message_id.unwrap_or_default());
        }
        ids
    }

    /// (visible, in flight) message counts.
    async fn counts(&self) -> Option<(u64, u64)> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.queue_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .ok()?;
        let attrs = out.attributes?;
        let n = |k: QueueAttributeName| attrs.get(&k).and_then(|v| v.parse().ok());
        Some((
            n(QueueAttributeName::ApproximateNumberOfMessages)?,
            n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?,
        ))
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
    assert_eq!(
        worker.count(" - Received"),
        seen + 1,
        "a bad message came back"
    );
    assert_eq!(s.counts().await, Some((0, 6)));
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
    let ids = s.send(&["300"; 10]).await;
    let mut worker = Service::spawn(BIN, &[], &env);
    worker.wait_for_count(" - Done", 2, START).await;
    proxy.cut();
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
async fn queue_consumer_idle_for_a_minute_makes_no_protection_calls() {
    let s = Setup::start(30).await;
    let mut worker = s.worker(&[("QUEUE_WAIT_SECONDS", "20")]).await;
    // About absence: nothing to wait for but the time itself.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(worker.count("Long polling for messages") >= 3);
    assert_eq!(s.agent.all_requests().await, 0);
    stop(&mut worker, STEP).await;
    assert_eq!(s.agent.all_requests().await, 0);
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
            with(&[
                ("COPILOT_QUEUE_URI", url),
                ("TASK_PROTECTION_BACKEND", "agent"),
            ]),
            "ECS_AGENT_URI",
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
    ] {
        assert!(
            stdout.contains(&format!("[env: {var}=")),
            "{var} missing from --help"
        );
    }
}
