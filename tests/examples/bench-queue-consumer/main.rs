//! Throughput and request counts of `queue-consumer` against moto, beside moto's own
//! ceiling measured in the same run. Not part of the test command; see BENCHMARKS.md.
//!
//! ```text
//! cargo build --release --bin queue-consumer
//! cargo run --release -p e2e --example bench-queue-consumer -- [--jobs 2000] [--idle-seconds 120]
//! cargo run --release -p e2e --example bench-queue-consumer -- --mixes [--trickle-seconds 60] [--rounds 3] [--long-jobs 5000]
//! ```
//!
//! `--mixes` runs the mixes of queues and jobs instead ([`mixes`]), each beside a plain
//! receive/delete loop in the same run.
//!
//! For each run: a fresh queue holding `--jobs` zero-millisecond jobs, SQS requests
//! counted by a proxy that reads each request's `x-amz-target`, and protection PUTs
//! recorded by a fake ECS agent. After the runs the workers stay up, idle, for
//! `--idle-seconds` once their maintain window has passed, and the PUTs made
//! meanwhile are reported. Two pairs of runs differ only in `METRICS` (off, then EMF
//! every second), to show what metrics cost, and count the EMF lines written.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, Message, QueueAttributeName, SendMessageBatchRequestEntry,
};
use e2e::agent::FakeAgent;
use e2e::bench::procfs;
use e2e::counting::CountingProxy;
use e2e::moto::{Moto, aws_env, client_for};
use e2e::process::binary;
use e2e::wait_for;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::Notify;

mod mixes;

/// How long the protection is kept after the last job: 10 % of 1 minute.
const MAINTAIN_WINDOW: Duration = Duration::from_secs(6);

struct Args {
    jobs: usize,
    idle: Duration,
    mixes: bool,
    trickle: Duration,
    rounds: usize,
    /// Short jobs beside the long one in the mixes: enough that a run lasts long
    /// enough to compare (1,000 take about half a second on the worker's side).
    long_jobs: usize,
}

fn args() -> Args {
    let mut args = Args {
        jobs: 2000,
        idle: Duration::from_secs(120),
        mixes: false,
        trickle: Duration::from_secs(60),
        rounds: 3,
        long_jobs: 5000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--mixes" {
            args.mixes = true;
            continue;
        }
        let value: u64 = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{flag} needs a whole number"));
        match flag.as_str() {
            "--jobs" => args.jobs = usize::try_from(value).unwrap_or(2000),
            "--idle-seconds" => args.idle = Duration::from_secs(value),
            "--trickle-seconds" => args.trickle = Duration::from_secs(value),
            "--rounds" => args.rounds = usize::try_from(value).unwrap_or(3).max(1),
            "--long-jobs" => args.long_jobs = usize::try_from(value).unwrap_or(5000).max(1),
            other => panic!(
                "unknown flag {other}; use --jobs N --idle-seconds N, or --mixes --trickle-seconds N --rounds N --long-jobs N"
            ),
        }
    }
    args
}

/// A number no earlier call returned, for queue names.
fn unique() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Puts `jobs` zero-millisecond jobs on `queue`, ten per call; on a FIFO queue,
/// `groups` message groups, dealt round robin.
async fn fill(client: &Client, queue: &str, jobs: usize, groups: Option<usize>) {
    let mut sent = 0;
    while sent < jobs {
        let n = (jobs - sent).min(10);
        let entries = (0..n)
            .map(|i| {
                let k = sent + i;
                let entry = SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body("0");
                match groups {
                    Some(groups) => entry
                        .message_group_id(format!("g{}", k % groups))
                        .message_deduplication_id(k.to_string()),
                    None => entry,
                }
                .build()
                .expect("entry")
            })
            .collect();
        client
            .send_message_batch()
            .queue_url(queue)
            .set_entries(Some(entries))
            .send()
            .await
            .expect("send_message_batch");
        sent += n;
    }
}

/// A plain client: receive up to `max`, delete what came (one call per message, or
/// one batch), until `jobs` are gone.
async fn plain(client: &Client, queue: &str, jobs: usize, max: i32) {
    let mut done = 0;
    while done < jobs {
        let out = client
            .receive_message()
            .queue_url(queue)
            .max_number_of_messages(max)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("receive");
        let messages = out.messages.unwrap_or_default();
        if max == 1 {
            for m in &messages {
                client
                    .delete_message()
                    .queue_url(queue)
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .send()
                    .await
                    .expect("delete");
            }
        } else if !messages.is_empty() {
            delete_batch(client, queue, &messages).await;
        }
        done += messages.len();
    }
}

/// Deletes `messages` of `queue` in one `DeleteMessageBatch`, as a plain loop does.
async fn delete_batch(client: &Client, queue: &str, messages: &[Message]) {
    let entries = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(m.receipt_handle().unwrap_or_default())
                .build()
                .expect("entry")
        })
        .collect();
    let out = client
        .delete_message_batch()
        .queue_url(queue)
        .set_entries(Some(entries))
        .send()
        .await
        .expect("delete batch");
    assert!(out.failed().is_empty(), "{:?}", out.failed());
}

struct Row {
    what: String,
    secs: f64,
    jobs: usize,
    requests: u64,
    detail: String,
}

impl Row {
    fn print(&self) {
        #[allow(clippy::cast_precision_loss)]
        let (jobs, requests) = (self.jobs as f64, self.requests as f64);
        println!(
            "| {} | {:.1} | {:.0} | {} | {:.3} | {} |",
            self.what,
            self.secs,
            jobs / self.secs,
            self.requests,
            requests / jobs,
            self.detail
        );
    }
}

async fn baseline(moto: &Moto, jobs: usize, max: i32) -> Row {
    let queue = moto.create_queue(&format!("baseline-{max}"), 30).await;
    fill(&moto.client(), &queue, jobs, None).await;
    let proxy = CountingProxy::start(([127, 0, 0, 1], moto.port()).into()).await;
    let client = client_for(&proxy.endpoint());
    let start = Instant::now();
    plain(&client, &queue, jobs, max).await;
    Row {
        what: format!(
            "plain client, receive {max} + delete{}",
            if max == 1 { "" } else { " batch" }
        ),
        secs: start.elapsed().as_secs_f64(),
        jobs,
        requests: proxy.total(),
        detail: format!("{:?}", proxy.counts()),
    }
}

/// A worker under test, with its own queue, proxy and agent.
struct Run {
    child: tokio::process::Child,
    agent: FakeAgent,
    proxy: CountingProxy,
    row: Row,
    puts_in_run: usize,
    idle_from: usize,
    /// EMF lines the worker wrote during the run.
    emf_lines: Arc<AtomicUsize>,
}

/// The queues of a run.
#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// One standard queue.
    One,
    /// A FIFO queue with this many message groups.
    Fifo(usize),
    /// Two standard queues, half the jobs each, the second in
    /// `COPILOT_TOPIC_QUEUE_URIS`.
    Two,
}

async fn run_worker(
    moto: &Moto,
    jobs: usize,
    concurrency: usize,
    shape: Shape,
    metrics: bool,
) -> Run {
    let client = moto.client();
    let mut env: Vec<(&str, String)> = Vec::new();
    // Explicitly: METRICS=auto means EMF here, since ECS_AGENT_URI is set.
    if metrics {
        env.extend([
            ("METRICS", "emf".to_owned()),
            ("METRICS_INTERVAL_SECONDS", "1".to_owned()),
            ("METRICS_SERVICE", "bench".to_owned()),
        ]);
    } else {
        env.push(("METRICS", "off".to_owned()));
    }
    let mut emptied = Vec::new();
    let (queue, what) = match shape {
        Shape::One => {
            let queue = moto
                .create_queue(&format!("jobs-c{concurrency}-m{metrics}-{}", unique()), 30)
                .await;
            fill(&client, &queue, jobs, None).await;
            let what = if metrics {
                ", METRICS=emf every 1 s"
            } else {
                ", METRICS=off"
            };
            (queue, what.to_owned())
        }
        Shape::Fifo(groups) => {
            let queue = client
                .create_queue()
                .queue_name(format!("jobs-c{concurrency}.fifo"))
                .attributes(QueueAttributeName::FifoQueue, "true")
                .send()
                .await
                .expect("create_queue")
                .queue_url
                .unwrap_or_default();
            fill(&client, &queue, jobs, Some(groups)).await;
            // moto's long poll on a FIFO queue keeps the groups in flight at its start
            // for its whole wait: short polls, or each group step waits out a poll.
            env.push(("QUEUE_WAIT_SECONDS", "1".to_owned()));
            (
                queue,
                format!(", FIFO, {groups} groups, QUEUE_WAIT_SECONDS=1"),
            )
        }
        Shape::Two => {
            let queue = moto
                .create_queue(&format!("jobs-c{concurrency}-a"), 30)
                .await;
            let other = moto
                .create_queue(&format!("jobs-c{concurrency}-b"), 30)
                .await;
            fill(&client, &queue, jobs / 2, None).await;
            fill(&client, &other, jobs - jobs / 2, None).await;
            emptied.push(other.clone());
            env.push((
                "COPILOT_TOPIC_QUEUE_URIS",
                format!(r#"{{"otherEventsQueue":"{other}"}}"#),
            ));
            (queue, ", two queues".to_owned())
        }
    };
    let agent = FakeAgent::start().await;
    let proxy = CountingProxy::start(([127, 0, 0, 1], moto.port()).into()).await;
    let mut cmd = tokio::process::Command::new(binary("queue-consumer"));
    cmd.env_clear()
        .envs(aws_env(&proxy.endpoint()))
        .env("COPILOT_QUEUE_URI", &queue)
        .env("WORKER_CONCURRENCY", concurrency.to_string())
        .env("ECS_AGENT_URI", agent.uri())
        .env("TASK_PROTECTION_BACKEND", "agent")
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn queue-consumer");
    let done = Arc::new(AtomicUsize::new(0));
    let emf_lines = Arc::new(AtomicUsize::new(0));
    let changed = Arc::new(Notify::new());
    if let Some(out) = child.stdout.take() {
        let (done, changed, emf) = (
            Arc::clone(&done),
            Arc::clone(&changed),
            Arc::clone(&emf_lines),
        );
        tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with('{') && line.contains(r#""_aws":"#) {
                    emf.fetch_add(1, Ordering::SeqCst);
                } else if line.contains(" - Done") {
                    done.fetch_add(1, Ordering::SeqCst);
                    changed.notify_one();
                } else if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("[c{concurrency}] {line}");
                }
            }
        });
    }
    while done.load(Ordering::SeqCst) < jobs {
        tokio::time::timeout(Duration::from_secs(300), changed.notified())
            .await
            .expect("the worker stalled");
    }
    // "Done" is logged before the delete: the run ends when the queues are empty.
    emptied.push(queue.clone());
    for q in &emptied {
        mixes::wait_empty(&client, q).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let requests = proxy.total();
    let mut detail = format!("{:?}", proxy.counts());
    if let Some(ticks) = child.id().and_then(procfs::cpu_ticks) {
        #[allow(clippy::cast_precision_loss)]
        let secs = ticks as f64 / 100.0;
        detail = format!("{detail}; worker CPU {secs:.2} s");
    }
    if metrics {
        detail = format!("{detail}; {} EMF lines", emf_lines.load(Ordering::SeqCst));
    }
    Run {
        child,
        emf_lines,
        puts_in_run: agent.puts().len(),
        idle_from: 0,
        agent,
        proxy,
        row: Row {
            what: format!("queue-consumer, WORKER_CONCURRENCY={concurrency}{what}"),
            secs,
            jobs,
            requests,
            detail,
        },
    }
}

#[tokio::main]
async fn main() {
    let args = args();
    let moto = Moto::start().await;
    if args.mixes {
        mixes::run(&moto, args.trickle, args.rounds, args.long_jobs).await;
        return;
    }
    println!(
        "{} zero-ms jobs per run, moto_server on loopback, {} cores",
        args.jobs,
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    let mut rows = vec![
        baseline(&moto, args.jobs, 1).await,
        baseline(&moto, args.jobs, 10).await,
    ];
    let mut runs = Vec::new();
    for (concurrency, shape, metrics) in [
        (1, Shape::One, false),
        (10, Shape::One, false),
        (10, Shape::One, true),
        (10, Shape::One, false),
        (10, Shape::One, true),
        (10, Shape::Fifo(10), false),
        (10, Shape::Two, false),
    ] {
        let run = run_worker(&moto, args.jobs, concurrency, shape, metrics).await;
        runs.push(run);
    }
    // Idle: once each worker has released protection after its maintain window.
    for run in &mut runs {
        wait_for(
            "protection to be released after the run",
            MAINTAIN_WINDOW * 4,
            || async {
                (run.agent.puts().len() > run.puts_in_run || run.agent.released()).then_some(())
            },
        )
        .await;
        run.idle_from = run.agent.puts().len();
    }
    let idle_start = Instant::now();
    tokio::time::sleep(args.idle).await;
    println!();
    println!("| run | seconds | jobs/s | SQS requests | requests/job | by operation |");
    println!("|---|---:|---:|---:|---:|---|");
    for row in &rows {
        row.print();
    }
    rows.clear();
    for run in &runs {
        run.row.print();
    }
    println!();
    println!(
        "| run | PUTs during the run (acquire, release) | PUTs idle, {:.0} s after release | SQS requests while idle | EMF lines, run and idle |",
        idle_start.elapsed().as_secs_f64()
    );
    println!("|---|---:|---:|---:|---:|");
    for run in &mut runs {
        let puts = run.agent.puts();
        let kinds: Vec<&str> = puts[..run.idle_from]
            .iter()
            .map(|p| if p.enabled() { "enable" } else { "disable" })
            .collect();
        println!(
            "| {} | {} ({}) | {} | {} | {} |",
            run.row.what,
            run.idle_from,
            kinds.join(", "),
            puts.len() - run.idle_from,
            run.proxy.total() - run.row.requests,
            run.emf_lines.load(Ordering::SeqCst),
        );
        if let Some(pid) = run.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let status = tokio::time::timeout(Duration::from_secs(30), run.child.wait())
            .await
            .expect("the worker did not stop");
        assert!(status.is_ok_and(|s| s.success()), "the worker failed");
    }
}
