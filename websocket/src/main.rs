//! `websocket`: parses its settings, then serves until SIGTERM or ctrl-c. A second
//! signal tells every client still waiting for its goodbye at once.

use std::process::ExitCode;
use std::time::Duration;

use task_protection::TaskProtection;
use task_protection::cli::{
    ProtectionArgs, exit_config_error, init_logging, parse_or_exit, signals,
};
use websocket::config::{Command, Config, protection_defaults};
use websocket::{App, healthcheck};

/// jemalloc rather than glibc's malloc: after a burst of clients has gone, glibc keeps
/// the freed memory (RSS stayed at the burst's peak); jemalloc's background thread
/// hands it back within about a second (`dirty_decay_ms` in `.cargo/config.toml`),
/// and an idle client costs about the same. BENCHMARKS.md has the figures.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config: Config =
        parse_or_exit(|cmd| ProtectionArgs::with_defaults(cmd, &protection_defaults()));
    let server = config
        .server_settings()
        .unwrap_or_else(|e| exit_config_error("websocket", &e.to_string()));

    if let Some(Command::Healthcheck { timeout_seconds }) = config.command {
        let target = healthcheck::target(server.listen);
        return match healthcheck::check(target, Duration::from_secs(timeout_seconds)).await {
            Ok(()) => {
                println!("healthy");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("websocket: unhealthy: {e}");
                ExitCode::FAILURE
            }
        };
    }

    init_logging(config.log_format);
    let metrics = config.metrics.install("websocket");
    websocket::http::raise_open_file_limit(server.max_connections);
    let settings = config
        .protection
        .settings()
        .unwrap_or_else(|e| exit_config_error("websocket", &e.to_string()));
    let protection = TaskProtection::connect(&config.protection.backend_config(), settings)
        .await
        .unwrap_or_else(|e| {
            exit_config_error("websocket", &task_protection::ErrorChain(&e).to_string())
        });
    let listen = server.listen;
    let drain = config
        .drain
        .start()
        .await
        .unwrap_or_else(|e| exit_config_error("websocket", &e.to_string()));
    let app = match App::build(server, protection).await {
        Ok(app) => app.with_drain(drain),
        Err(e) => {
            tracing::error!("cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(port = app.port(), "Listening on {}", app.local_addr());
    let mut signals = signals();
    let (hurry, hurried) = tokio::sync::oneshot::channel::<()>();
    let stopped = async move {
        let Some(signal) = signals.recv().await else {
            return std::future::pending().await;
        };
        tracing::info!("{} received", signal.name());
        tokio::spawn(async move {
            if let Some(signal) = signals.recv().await {
                tracing::info!("{} received again", signal.name());
                let _ = hurry.send(());
            }
        });
    };
    let hurried = async {
        if hurried.await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let code = match app.run(stopped, hurried).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("the server failed: {e}");
            ExitCode::FAILURE
        }
    };
    // The last interval's line, so nothing counted is lost at exit.
    if let Some(m) = &metrics {
        m.flush();
    }
    code
}
