//! `queue-consumer`: parse the settings, set up logging, run until SIGTERM;
//! `queue-consumer healthcheck`: ask the running worker's `/healthz`.

mod sleep;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use queue_consumer::Outcome;
use queue_consumer::config::{Config, protection_defaults};
use task_protection::cli::{ProtectionArgs, exit_config_error, init_logging, parse_or_exit};

/// `queue-consumer healthcheck`: for a container health check without curl.
#[derive(Debug, Parser)]
#[command(
    name = "queue-consumer healthcheck",
    about = "Asks the worker on HEALTH_PORT for /healthz; exits 0 when it answers 200, 1 otherwise"
)]
struct Healthcheck {
    /// Port of the worker's health endpoint
    #[arg(long, env = "HEALTH_PORT", value_name = "PORT")]
    health_port: u16,
    /// How long to wait for the answer, in seconds
    #[arg(long, value_name = "SECONDS", default_value = "3",
          value_parser = clap::value_parser!(u64).range(1..=60))]
    timeout_seconds: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    // A subcommand of its own: the worker's settings (COPILOT_QUEUE_URI among them)
    // are not needed to ask it how it is.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "healthcheck")
    {
        let args = Healthcheck::parse_from(std::env::args_os().skip(1));
        let timeout = Duration::from_secs(args.timeout_seconds);
        return match queue_consumer::health::check(args.health_port, timeout).await {
            Ok(()) => {
                println!("healthy");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("queue-consumer: unhealthy: {e}");
                ExitCode::FAILURE
            }
        };
    }
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
