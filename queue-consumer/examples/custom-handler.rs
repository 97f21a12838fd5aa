//! A worker with job code of its own: the README's example, compiled with the
//! workspace (`cargo run -p queue-consumer --example custom-handler`).

use queue_consumer::config::{Config, protection_defaults};
use queue_consumer::{Job, Verdict, handler_fn};
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
        tracing::info!("order {} from {}", order["id"], job.source);
        Verdict::Done
    });
    let _ = queue_consumer::run(config, orders, queue_consumer::signals::listen()).await;
}
