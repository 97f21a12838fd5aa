//! `queue-consumer`: parse the settings, set up logging, run until SIGTERM;
//! `queue-consumer healthcheck`: ask the running worker's `/healthz`.

mod sleep;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use queue_consumer::Outcome;
use queue_consumer::config::{Config, protection_defaults};
use task_protection::cli::{
    ProtectionArgs, exit_config_error, init_logging, parse_or_exit, ranged,
};

/// `queue-consumer healthcheck`: for a container health check without curl.
#[derive(Debug, Parser)]
#[command(
    name = "queue-consumer healthcheck",
    about = "Asks the worker on HEALTH_PORT for /healthz; exits 0 when it answers 200, 1 otherwise (a bad setting included: Docker reserves 2)"
)]
struct Healthcheck {
    /// Port of the worker's health endpoint (1..=65535)
    #[arg(long, env = "HEALTH_PORT", value_name = "PORT",
          value_parser = ranged("HEALTH_PORT", 1, u64::from(u16::MAX), ""))]
    health_port: u64,
    /// How long to wait for the answer, in seconds
    #[arg(long, value_name = "SECONDS", default_value = "3",
          value_parser = clap::value_parser!(u64).range(1..=60))]
    timeout_seconds: u64,
}

/// The health check's answer to arguments it cannot use: `--help` on stdout and 0;
/// anything else one line on stderr and 1, as unhealthy (Docker reserves exit code 2
/// for health checks).
fn healthcheck_usage(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        print!("{e}");
        return ExitCode::SUCCESS;
    }
    let why = if e.kind() == ErrorKind::MissingRequiredArgument {
        "HEALTH_PORT is not set: set it (or --health-port) to the worker's health port".to_owned()
    } else {
        e.to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .trim_start_matches("error: ")
            .to_owned()
    };
    eprintln!("queue-consumer healthcheck: {why}");
    ExitCode::FAILURE
}

#[tokio::main]
async fn main() -> ExitCode {
    // A subcommand of its own: the worker's settings (COPILOT_QUEUE_URI among them)
    // are not needed to ask it how it is.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "healthcheck")
    {
        let args = match Healthcheck::try_parse_from(std::env::args_os().skip(1)) {
            Ok(args) => args,
            Err(e) => return healthcheck_usage(&e),
        };
        let port = u16::try_from(args.health_port).unwrap_or_default();
        let timeout = Duration::from_secs(args.timeout_seconds);
        return match queue_consumer::health::check(port, timeout).await {
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
        Ok(Outcome::ReceiveFailed(failure)) => {
            // One line for ECS's stopped reason and the logs; the non-zero code has
            // ECS restart the task and a deployment's circuit breaker count it.
            eprintln!("queue-consumer: error: {failure}; {}", failure.advice());
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => exit_config_error("queue-consumer", &e.to_string()),
    }
}
