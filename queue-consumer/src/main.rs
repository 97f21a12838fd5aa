//! `queue-consumer`: parse the settings, set up logging, run until SIGTERM.

mod sleep;

use std::process::ExitCode;

use queue_consumer::Outcome;
use queue_consumer::config::{Config, protection_defaults};
use task_protection::cli::{ProtectionArgs, exit_config_error, init_logging, parse_or_exit};

#[tokio::main]
async fn main() -> ExitCode {
    let config: Config =
        parse_or_exit(|cmd| ProtectionArgs::with_defaults(cmd, &protection_defaults()));
    init_logging(config.log_format);
    let metrics = config.metrics.install("queue-consumer");
    let queue_url = config.queue_url.clone();
    // The sample's job: wait the milliseconds the body names. Put your own handler here.
    let handler = sleep::Sleep {
        max_job: config.worker_settings().max_job,
    };
    let result = queue_consumer::run(config, handler, queue_consumer::signals::listen()).await;
    // The last interval's metrics, written before exit.
    if let Some(m) = metrics {
        m.flush();
    }
    match result {
        Ok(Outcome::ReceiveFailed(e)) => {
            // One line for ECS's stopped reason and the logs; the non-zero code has
            // ECS restart the task and a deployment's circuit breaker count it.
            eprintln!(
                "queue-consumer: error: cannot receive messages from {queue_url}: {e}; {}",
                e.advice()
            );
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => exit_config_error("queue-consumer", &e.to_string()),
    }
}
