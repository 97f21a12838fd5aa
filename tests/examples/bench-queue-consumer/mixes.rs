//! The worker when the mix of queues and jobs is not uniform, each mix beside a plain
//! receive/delete loop (aws-sdk-sqs, no protection, no heartbeat) on the same moto in
//! the same run:
//!
//! - two queues, one idle: 300 jobs of 200 ms on a topic queue while the main queue
//!   is empty (20 s long polls), against the same queue alone;
//! - one long job: 5,000 zero-millisecond jobs (`--long-jobs`) at concurrency 10 with
//!   one 1 h job running all the while, against concurrency 9 without it;
//! - one FIFO group: 200 zero-millisecond jobs in one message group;
//! - a trickle: one short job a second; pickup latency (from just before the
//!   `SendMessage` to the job's start) and protection PUTs a minute, and how soon
//!   protection is released once the trickle stops.
//!
//! SQS requests are counted on the wire by the counting proxy; protection PUTs by
//! the fake agent. moto slows down as a queue grows (3,000 messages take over three
//! minutes to send, and then each receive is slower too), so the jobs are sent as
//! they are worked: at most [`AHEAD`] wait in a queue at any time, for every run of a
//! mix alike.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::QueueAttributeName;
use e2e::agent::FakeAgent;
use e2e::counting::{CountingProxy, Exchange};
use e2e::moto::{Moto, aws_env, client_for, queue_counts, send_all};
use e2e::process::binary;
use e2e::wait_for;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Notify;

use super::{delete_batch, unique};

/// Waits until `queue` holds nothing, visible or in flight.
pub(crate) async fn wait_empty(client: &Client, queue: &str) {
    wait_for(
        "the queue to be emptied",
        Duration::from_secs(300),
        || async { (queue_counts(client, queue).await == Some((0, 0))).then_some(()) },
    )
    .await;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A release-built worker under test, with its own proxy and agent, and the lines it
/// wrote that matter here, each with when it was read.
struct Worker {
    child: tokio::process::Child,
    agent: FakeAgent,
    proxy: CountingProxy,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    /// How many `Done` lines it wrote: counted as read, not by going through `lines`
    /// on each, which at 5,000 jobs would take the worker's CPU.
    done: Arc<AtomicUsize>,
    changed: Arc<Notify>,
    started: Instant,
}

impl Worker {
    async fn start(moto: &Moto, queue: &str, env: &[(&str, String)]) -> Self {
        let agent = FakeAgent::start().await;
        let proxy = CountingProxy::start(([127, 0, 0, 1], moto.port()).into()).await;
        let mut child = tokio::process::Command::new(binary("queue-consumer"))
            .env_clear()
            .envs(aws_env(&proxy.endpoint()))
            .env("COPILOT_QUEUE_URI", queue)
            .env("ECS_AGENT_URI", agent.uri())
            .env("TASK_PROTECTION_BACKEND", "agent")
            .env("METRICS", "off")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn queue-consumer");
        let started = Instant::now();
        let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let changed = Arc::new(Notify::new());
        let done = Arc::new(AtomicUsize::new(0));
        if let Some(out) = child.stdout.take() {
            let (lines, changed, done) =
                (Arc::clone(&lines), Arc::clone(&changed), Arc::clone(&done));
            tokio::spawn(async move {
                let mut reader = BufReader::new(out).lines();
                while let Ok(Some(line)) = reader.next_line().await {
                    let at = Instant::now();
                    if line.contains(" - Done") || line.contains(" - Started") {
                        if line.contains(" - Done") {
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                        lock(&lines).push((at, line));
                        changed.notify_one();
                    } else if line.contains("WARN") || line.contains("ERROR") {
                        eprintln!("[worker] {line}");
                    }
                }
            });
        }
        Self {
            child,
            agent,
            proxy,
            lines,
            done,
            changed,
            started,
        }
    }

    async fn wait_done(&self, n: usize) {
        while self.done.load(Ordering::Relaxed) < n {
            tokio::time::timeout(Duration::from_secs(300), self.changed.notified())
                .await
                .expect("the worker stalled");
        }
    }

    /// When the job of message `id` started.
    fn started_at(&self, id: &str) -> Option<Instant> {
        let needle = format!("{id} - Started");
        lock(&self.lines)
            .iter()
            .find(|(_, l)| l.contains(&needle))
            .map(|(at, _)| *at)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the worker did not stop");
        assert!(status.is_ok_and(|s| s.success()), "the worker failed");
    }
}

/// One measured run of a mix.
struct Row {
    mix: &'static str,
    run: String,
    jobs: usize,
    secs: f64,
    requests: u64,
    /// Median waits, in ms, from a delete's answer to the next receive, and from a
    /// receive's answer to the next delete.
    waits: (f64, f64),
}

/// For each request of `op`, the time since the last answer to `after` before it
/// (and after the previous request of `op`), in ms; their median.
fn median_wait(exchanges: &[Exchange], after: &str, op: &str) -> f64 {
    let mut waits = Vec::new();
    let mut since = None;
    for e in exchanges.iter().filter(|e| e.operation == op) {
        let answer = exchanges
            .iter()
            .filter(|a| a.operation == after)
            .filter_map(|a| a.answered_at)
            .filter(|t| *t <= e.sent_at && since.is_none_or(|s| *t >= s))
            .max();
        if let Some(answered) = answer {
            waits.push((e.sent_at - answered).as_secs_f64() * 1000.0);
        }
        since = Some(e.sent_at);
    }
    waits.sort_by(f64::total_cmp);
    waits.get(waits.len() / 2).copied().unwrap_or(f64::NAN)
}

fn waits_of(proxy: &CountingProxy) -> (f64, f64) {
    let exchanges = proxy.exchanges();
    (
        median_wait(&exchanges, "DeleteMessageBatch", "ReceiveMessage"),
        median_wait(&exchanges, "ReceiveMessage", "DeleteMessageBatch"),
    )
}

impl Row {
    #[allow(clippy::cast_precision_loss)]
    fn rate(&self) -> f64 {
        self.jobs as f64 / self.secs
    }

    #[allow(clippy::cast_precision_loss)]
    fn print(&self, baseline: &Row) {
        println!(
            "| {} | {} | {} | {:.2} | {:.1} | {:.3} | {:.0} / {:.0} | {:.2} × |",
            self.mix,
            self.run,
            self.jobs,
            self.secs,
            self.rate(),
            self.requests as f64 / self.jobs as f64,
            self.waits.0,
            self.waits.1,
            self.rate() / baseline.rate()
        );
    }
}

fn bodies(body: &str, n: usize) -> Vec<String> {
    vec![body.to_owned(); n]
}

/// The most jobs waiting in a queue at once; see the module's notes.
const AHEAD: usize = 200;

/// Sends `jobs` messages of `body` to `queue`: the first [`AHEAD`] now, the rest, a
/// half of `AHEAD` at a time, by the task returned whenever fewer than half wait.
async fn fill(
    client: &Client,
    queue: &str,
    group: Option<&'static str>,
    body: &str,
    jobs: usize,
) -> tokio::task::JoinHandle<()> {
    let first = jobs.min(AHEAD);
    send_all(client, queue, group, &bodies(body, first)).await;
    let (client, queue, body) = (client.clone(), queue.to_owned(), body.to_owned());
    tokio::spawn(async move {
        let mut sent = first;
        while sent < jobs {
            let waiting = queue_counts(&client, &queue)
                .await
                .map_or(AHEAD, |(v, _)| usize::try_from(v).unwrap_or(AHEAD));
            if waiting < AHEAD / 2 {
                let n = (AHEAD / 2).min(jobs - sent);
                send_all(&client, &queue, group, &bodies(&body, n)).await;
                sent += n;
            } else {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    })
}

async fn fifo_queue(client: &Client) -> String {
    client
        .create_queue()
        .queue_name(format!("mix-{}.fifo", unique()))
        .attributes(QueueAttributeName::FifoQueue, "true")
        .send()
        .await
        .expect("create_queue")
        .queue_url
        .unwrap_or_default()
}

/// A plain client: receive up to `batch`, run their jobs at once (each `job` long;
/// on a FIFO queue one after the other), delete them in one call, until `jobs` are
/// done.
async fn plain(
    moto: &Moto,
    queue: &str,
    jobs: usize,
    batch: i32,
    job: Duration,
    wait: i32,
) -> Measured {
    let proxy = CountingProxy::start(([127, 0, 0, 1], moto.port()).into()).await;
    let client = client_for(&proxy.endpoint());
    let fifo = queue.ends_with(".fifo");
    let start = Instant::now();
    let mut done = 0;
    while done < jobs {
        let messages = client
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(batch)
            .wait_time_seconds(wait)
            .send()
            .await
            .expect("receive")
            .messages
            .unwrap_or_default();
        if messages.is_empty() {
            continue;
        }
        if fifo {
            for _ in &messages {
                tokio::time::sleep(job).await;
            }
        } else {
            futures_util::future::join_all(messages.iter().map(|_| tokio::time::sleep(job))).await;
        }
        delete_batch(&client, queue, &messages).await;
        done += messages.len();
    }
    (
        start.elapsed().as_secs_f64(),
        proxy.total(),
        waits_of(&proxy),
    )
}

/// Runs the worker on `queue` (with `env`) until `jobs` are done and deleted.
async fn worker(
    moto: &Moto,
    queue: &str,
    jobs: usize,
    env: &[(&str, String)],
    emptied: &[&str],
) -> Measured {
    let w = Worker::start(moto, queue, env).await;
    w.wait_done(jobs).await;
    let client = moto.client();
    for q in emptied {
        wait_empty(&client, q).await;
    }
    let result = (
        w.started.elapsed().as_secs_f64(),
        w.proxy.total(),
        waits_of(&w.proxy),
    );
    w.stop().await;
    result
}

fn env(pairs: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// One run's seconds, SQS requests and median waits (ms) before a receive and a
/// delete.
type Measured = (f64, u64, (f64, f64));

/// The runs the mixes are made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// The plain loop: batch, job length, FIFO.
    Plain { batch: i32, job_ms: u64, fifo: bool },
    /// The worker on one queue of 200 ms jobs.
    Alone,
    /// The worker on an idle main queue and a topic queue of 200 ms jobs.
    BesideIdle,
    /// The worker at concurrency 9, zero-millisecond jobs.
    Nine,
    /// The worker at concurrency 10, zero-millisecond jobs and one of an hour.
    TenWithLongJob,
    /// The worker on one FIFO group of zero-millisecond jobs.
    FifoGroup,
}

impl Run {
    fn describe(self) -> String {
        match self {
            Self::Plain {
                batch,
                job_ms,
                fifo,
            } => format!(
                "plain loop: receive {batch}, {}, delete batch",
                match (job_ms, fifo) {
                    (0, _) => "no job".to_owned(),
                    (ms, true) => format!("{ms} ms jobs one after the other"),
                    (ms, false) => format!("{batch} jobs of {ms} ms at once"),
                }
            ),
            Self::Alone => "queue-consumer, concurrency 10, the busy queue alone".into(),
            Self::BesideIdle => {
                "queue-consumer, concurrency 10, beside an idle queue (20 s polls)".into()
            }
            Self::Nine => "queue-consumer, concurrency 9, no long job".into(),
            Self::TenWithLongJob => {
                "queue-consumer, concurrency 10, one 1 h job running all the while".into()
            }
            Self::FifoGroup => "queue-consumer, concurrency 10, QUEUE_WAIT_SECONDS=1".into(),
        }
    }

    /// One run on fresh queues holding `jobs` jobs: (seconds, SQS requests, waits).
    async fn measure(self, moto: &Moto, jobs: usize) -> Measured {
        let client = moto.client();
        let queue = |name: &str| format!("{name}-{}", unique());
        let ten = env(&[("WORKER_CONCURRENCY", "10")]);
        match self {
            Self::Plain {
                batch,
                job_ms,
                fifo,
            } => {
                let q = if fifo {
                    fifo_queue(&client).await
                } else {
                    moto.create_queue(&queue("plain"), 30).await
                };
                let group = fifo.then_some("g");
                let feeder = fill(&client, &q, group, &job_ms.to_string(), jobs).await;
                let measured = plain(moto, &q, jobs, batch, Duration::from_millis(job_ms), 1).await;
                feeder.await.expect("feeder");
                measured
            }
            Self::Alone => {
                let q = moto.create_queue(&queue("busy"), 30).await;
                let feeder = fill(&client, &q, None, "200", jobs).await;
                let measured = worker(moto, &q, jobs, &ten, &[&q]).await;
                feeder.await.expect("feeder");
                measured
            }
            Self::BesideIdle => {
                let idle = moto.create_queue(&queue("idle"), 30).await;
                let busy = moto.create_queue(&queue("busy"), 30).await;
                let feeder = fill(&client, &busy, None, "200", jobs).await;
                let topics = format!(r#"{{"busyEventsQueue":"{busy}"}}"#);
                let mut e = ten.clone();
                e.push(("COPILOT_TOPIC_QUEUE_URIS", topics));
                let measured = worker(moto, &idle, jobs, &e, &[&busy]).await;
                feeder.await.expect("feeder");
                measured
            }
            Self::Nine => {
                let q = moto.create_queue(&queue("c9"), 30).await;
                let feeder = fill(&client, &q, None, "0", jobs).await;
                let nine = env(&[("WORKER_CONCURRENCY", "9")]);
                let measured = worker(moto, &q, jobs, &nine, &[&q]).await;
                feeder.await.expect("feeder");
                measured
            }
            Self::TenWithLongJob => {
                let q = moto.create_queue(&queue("c10"), 30).await;
                // Sent first, so it is among the first received, and long enough to
                // run for the whole measurement.
                send_all(&client, &q, None, &bodies("3600000", 1)).await;
                let feeder = fill(&client, &q, None, "0", jobs).await;
                let mut e = ten.clone();
                e.push(("SHUTDOWN_GRACE_SECONDS", "0".to_owned()));
                let w = Worker::start(moto, &q, &e).await;
                w.wait_done(jobs).await;
                feeder.await.expect("feeder");
                wait_for(
                    "the short jobs deleted",
                    Duration::from_secs(60),
                    || async { (queue_counts(&client, &q).await == Some((0, 1))).then_some(()) },
                )
                .await;
                let result = (
                    w.started.elapsed().as_secs_f64(),
                    w.proxy.total(),
                    waits_of(&w.proxy),
                );
                w.stop().await;
                result
            }
            Self::FifoGroup => {
                let q = fifo_queue(&client).await;
                let feeder = fill(&client, &q, Some("g"), "0", jobs).await;
                // moto's long poll on a FIFO queue leaves out the groups in flight at
                // its start for its whole wait: 1 s polls, as the plain loop's.
                let mut e = ten.clone();
                e.push(("QUEUE_WAIT_SECONDS", "1".to_owned()));
                let measured = worker(moto, &q, jobs, &e, &[&q]).await;
                feeder.await.expect("feeder");
                measured
            }
        }
    }
}

/// Runs `runs` in turn, `rounds` times, so that a change of load on the shared
/// machine falls on all of them; one row each, with the median round.
async fn mix(
    moto: &Moto,
    name: &'static str,
    jobs: usize,
    runs: &[Run],
    rounds: usize,
) -> Vec<Row> {
    let mut results: Vec<Vec<Measured>> = vec![Vec::new(); runs.len()];
    for _ in 0..rounds {
        for (i, run) in runs.iter().enumerate() {
            results[i].push(run.measure(moto, jobs).await);
        }
    }
    runs.iter()
        .zip(results)
        .map(|(run, mut r)| {
            r.sort_by(|a, b| a.0.total_cmp(&b.0));
            let rounds: Vec<String> = r.iter().map(|x| format!("{:.2}", x.0)).collect();
            let (secs, requests, waits) = r[r.len() / 2];
            Row {
                mix: name,
                run: format!("{} (rounds: {} s)", run.describe(), rounds.join(", ")),
                jobs,
                secs,
                requests,
                waits,
            }
        })
        .collect()
}

/// Latencies, in milliseconds: p50, p99, max.
fn percentiles(mut ms: Vec<f64>) -> (f64, f64, f64) {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((ms.len() as f64 - 1.0) * q).round() as usize;
        ms.get(i).copied().unwrap_or(f64::NAN)
    };
    (at(0.5), at(0.99), ms.last().copied().unwrap_or(f64::NAN))
}

/// Sends one message to `queue` every `every`, `n` times; returns each message's id
/// and when its `SendMessage` started.
async fn trickle(
    client: Client,
    queue: String,
    n: usize,
    every: Duration,
    body: &'static str,
) -> Vec<(String, Instant)> {
    let mut tick = tokio::time::interval(every);
    let mut sent = Vec::new();
    for _ in 0..n {
        tick.tick().await;
        let at = Instant::now();
        let id = client
            .send_message()
            .queue_url(&queue)
            .message_body(body)
            .send()
            .await
            .expect("send")
            .message_id
            .unwrap_or_default();
        sent.push((id, at));
    }
    sent
}

/// The plain loop's side of the trickle: when each message was received.
async fn plain_trickle(client: Client, queue: String, n: usize) -> HashMap<String, Instant> {
    let mut received = HashMap::new();
    while received.len() < n {
        let messages = client
            .receive_message()
            .queue_url(&queue)
            .max_number_of_messages(10)
            .wait_time_seconds(20)
            .send()
            .await
            .expect("receive")
            .messages
            .unwrap_or_default();
        let at = Instant::now();
        for m in &messages {
            received.insert(m.message_id().unwrap_or_default().to_owned(), at);
            client
                .delete_message()
                .queue_url(&queue)
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .send()
                .await
                .expect("delete");
        }
    }
    received
}

async fn trickles(moto: &Moto, length: Duration) {
    let every = Duration::from_secs(1);
    let n = usize::try_from(length.as_secs()).unwrap_or(60).max(2);
    let client = moto.client();
    let wq = moto
        .create_queue(&format!("trickle-{}", unique()), 30)
        .await;
    let pq = moto
        .create_queue(&format!("trickle-plain-{}", unique()), 30)
        .await;
    // The defaults: 20 s polls, concurrency 1, protection 1 min, maintain 10 %.
    let w = Worker::start(moto, &wq, &[]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let plain_side = tokio::spawn(plain_trickle(client_for(&moto.endpoint()), pq.clone(), n));
    let (to_worker, to_plain) = tokio::join!(
        trickle(client.clone(), wq.clone(), n, every, "10"),
        trickle(client.clone(), pq.clone(), n, every, "10"),
    );
    let trickle_end = Instant::now();
    w.wait_done(n).await;
    let puts_in_trickle = w
        .agent
        .puts()
        .iter()
        .filter(|p| p.at <= trickle_end)
        .count();
    let last_done = lock(&w.lines)
        .iter()
        .filter(|(_, l)| l.contains(" - Done"))
        .map(|(at, _)| *at)
        .max()
        .unwrap_or(trickle_end);
    wait_for(
        "protection released after the trickle",
        Duration::from_secs(120),
        || async { (!w.agent.ecs_protected_at(Instant::now())).then_some(()) },
    )
    .await;
    let released = w
        .agent
        .ecs_changes()
        .last()
        .map_or(last_done, |(at, _)| *at)
        .saturating_duration_since(last_done);
    let received = plain_side.await.expect("plain loop");
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let worker_latency: Vec<f64> = to_worker
        .iter()
        .filter_map(|(id, sent)| Some(ms(w.started_at(id)?.saturating_duration_since(*sent))))
        .collect();
    let plain_latency: Vec<f64> = to_plain
        .iter()
        .filter_map(|(id, sent)| Some(ms(received.get(id)?.saturating_duration_since(*sent))))
        .collect();
    #[allow(clippy::cast_precision_loss)]
    let per_minute = puts_in_trickle as f64 * 60.0 / length.as_secs_f64().max(1.0);
    println!();
    println!(
        "| a trickle: one 10 ms job a second for {} s | pickup p50 ms | p99 ms | max ms | protection PUTs (a minute) | released after the last job |",
        length.as_secs()
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let (p50, p99, max) = percentiles(plain_latency);
    println!("| plain loop, 20 s polls, no protection | {p50:.1} | {p99:.1} | {max:.1} | — | — |");
    let (p50, p99, max) = percentiles(worker_latency);
    println!(
        "| queue-consumer, the defaults | {p50:.1} | {p99:.1} | {max:.1} | {puts_in_trickle} ({per_minute:.1}) | {:.1} s |",
        released.as_secs_f64()
    );
    w.stop().await;
}

/// Runs every mix (each run `rounds` times, in turn) and prints the tables.
pub(crate) async fn run(moto: &Moto, trickle: Duration, rounds: usize, long_jobs: usize) {
    println!(
        "mixes on moto_server on loopback, {} cores",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    let plain = |batch, job_ms, fifo| Run::Plain {
        batch,
        job_ms,
        fifo,
    };
    let groups = vec![
        mix(
            moto,
            "two queues, one idle",
            300,
            &[plain(10, 200, false), Run::Alone, Run::BesideIdle],
            rounds,
        )
        .await,
        mix(
            moto,
            "one long job",
            long_jobs,
            &[plain(9, 0, false), Run::Nine, Run::TenWithLongJob],
            rounds,
        )
        .await,
        mix(
            moto,
            "one FIFO group",
            200,
            &[plain(10, 0, true), Run::FifoGroup],
            rounds,
        )
        .await,
    ];
    println!();
    println!(
        "| mix | run | jobs | seconds | jobs/s | SQS requests/job | median ms before a receive / a delete | jobs/s against the first row |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for rows in &groups {
        for row in rows {
            row.print(&rows[0]);
        }
    }
    trickles(moto, trickle).await;
}
