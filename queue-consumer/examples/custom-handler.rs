//! A worker with job code of its own: the README's example, compiled with the
//! workspace (`cargo run -p queue-consumer --example custom-handler`).

use queue_consumer::config::{Config, protection_defaults};
use queue_consumer::{Job, Verdict, handler_fn};
use std::time::Duration;
use task_protection::cli::{ProtectionArgs, init_logging, parse_or_exit};

#[tokio::main]
async fn main() {
    let config: Config =
        parse_or_exit(|c| ProtectionArgs::with_defaults(c, &protection_defaults()));
    init_logging(config.log_format);
    let orders = handler_fn(|job: Job| async move {
        let Ok(order) = serde_json::from_str::<serde_json::Value>(&job.body) else {
            return Verdict::BadInput("not a JSON order".to_owned());
        };
        let kind = job.attribute("kind").unwrap_or("order");
        tracing::info!(trace = ?job.trace_header, "{kind} {} from {}", order["id"], job.source);
        if order["items"].as_u64() > Some(100) {
            // A big one: should this task die, no other takes it for 15 minutes.
            if let Err(e) = job.extend_visibility(Duration::from_secs(900)).await {
                return Verdict::Failed(format!("cannot keep the order: {e}"));
            }
        }
        tokio::select! {
            () = ship(&order) => Verdict::Done,
            // SIGTERM: hand it back at once rather than at the end of the grace period.
            () = job.shutdown.cancelled() => Verdict::RetryAfter(Duration::ZERO),
        }
    });
    let _ = queue_consumer::run(config, orders, queue_consumer::signals::listen()).await;
}

async fn ship(order: &serde_json::Value) {
    tokio::time::sleep(Duration::from_millis(order["items"].as_u64().unwrap_or(1))).await;
}
