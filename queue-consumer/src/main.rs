//! `queue-consumer`: parse the settings, set up logging, run until SIGTERM.

use std::process::ExitCode;

use queue_consumer::config::{Config, protection_defaults};
use task_protection::cli::{
    ProtectionArgs, exit_config_error, init_logging, parse_or_exit, shutdown_signal,
};

#[tokio::main]
async fn main() -> ExitCode {
    let config: Config =
        parse_or_exit(|cmd| ProtectionArgs::with_defaults(cmd, &protection_defaults()));
    init_logging(config.log_format);
    match queue_consumer::run(config, shutdown_signal()).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => exit_config_error("queue-consumer", &e.to_string()),
    }
}
