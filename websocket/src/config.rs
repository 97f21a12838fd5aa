//! The server's settings: command-line arguments, each also read from its environment
//! variable, parsed once at the edge into [`ServerSettings`].
//!
//! Copilot configures a Load Balanced Web Service through environment variables, so
//! every setting has one; the flags exist for running it by hand. A bad value stops
//! the server at start-up with one line that names the variable.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::{Parser, Subcommand};
use task_protection::ProtectionSettings;
use task_protection::cli::{DrainArgs, LogFormat, MetricsArgs, ProtectionArgs, ranged};

use crate::connection::limits::Limits;

/// The longest ping interval accepted. The ALB cuts a websocket that carries nothing
/// for its idle timeout (60 s by default, at most 4000 s), so longer makes no sense.
pub const MAX_PING_INTERVAL_SECONDS: u64 = 3600;
/// The longest shutdown grace period accepted; ECS allows a stop timeout of 120 s.
pub const MAX_GRACE_SECONDS: u64 = 3600;
/// The most connections one process may be asked to hold.
pub const MAX_CONNECTIONS_LIMIT: u64 = 1_000_000;
/// The largest message size that may be configured.
pub const MAX_MESSAGE_BYTES_LIMIT: u64 = 1024 * 1024;
/// The longest connection lifetime that may be configured: a week.
pub const MAX_LIFETIME_SECONDS: u64 = 7 * 24 * 3600;

/// The settings of `websocket`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "websocket",
    version,
    about = "A websocket server that protects its ECS task from scale-in while clients are connected",
    long_about = None,
)]
pub struct Config {
    /// What to do; without a subcommand, serve.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// TCP port to listen on; the page, the websocket, /healthz and /status share it
    #[arg(long, env = "PORT", value_name = "PORT", default_value = "3000",
          value_parser = ranged("PORT", 0, u64::from(u16::MAX), ""))]
    pub port: u64,

    /// Address to listen on
    #[arg(long, env = "BIND_ADDRESS", value_name = "IP",
          default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub bind_address: IpAddr,

    /// Seconds between the server's pings to each client; keep it below the load
    /// balancer's idle timeout (60 s on an ALB). A client that misses two pongs is
    /// dropped (1..=3600)
    #[arg(long, env = "WS_PING_INTERVAL_SECONDS", value_name = "SECONDS", default_value = "25",
          value_parser = ranged("WS_PING_INTERVAL_SECONDS", 1, MAX_PING_INTERVAL_SECONDS, "seconds"))]
    pub ws_ping_interval_seconds: u64,

    /// Most clients connected at once; past it new clients get HTTP 503. Each costs
    /// at most about 22 KB however it behaves (BENCHMARKS.md), so the default fits a
    /// 512 MiB task with room to spare (1..=1000000)
    #[arg(long, env = "MAX_CONNECTIONS", value_name = "N", default_value = "10000",
          value_parser = ranged("MAX_CONNECTIONS", 1, MAX_CONNECTIONS_LIMIT, ""))]
    pub max_connections: u64,

    /// Largest message a client may send, in bytes; a larger one is answered with
    /// close code 1009. The page's messages are a few bytes, and every connection
    /// may hold about this much (16..=1048576)
    #[arg(long, env = "MAX_MESSAGE_BYTES", value_name = "BYTES", default_value = "1024",
          value_parser = ranged("MAX_MESSAGE_BYTES", 16, MAX_MESSAGE_BYTES_LIMIT, "bytes"))]
    pub max_message_bytes: u64,

    /// After this many seconds a client is told `please reconnect` and closed with
    /// 1001, so it may land on another task and no client keeps the task protected
    /// forever; checked at each ping. The default, an hour, costs each client one
    /// reconnect an hour. 0: never (0..=604800)
    #[arg(long, env = "MAX_CONNECTION_LIFETIME_SECONDS", value_name = "SECONDS",
          default_value = "3600",
          value_parser = ranged("MAX_CONNECTION_LIFETIME_SECONDS", 0, MAX_LIFETIME_SECONDS, "seconds"))]
    pub max_connection_lifetime_seconds: u64,

    /// Origins whose pages may open a websocket, comma-separated, e.g.
    /// https://app.example.com; a browser's upgrade from any other origin gets HTTP
    /// 403. Unset: pages from any site may connect, and each connection holds the
    /// task's protection
    #[arg(long, env = "ALLOWED_ORIGINS", value_name = "ORIGINS", value_delimiter = ',',
          value_parser = parse_origin)]
    pub allowed_origins: Vec<String>,

    /// Seconds a client gets to send a request's headers, which is also how long an
    /// idle keep-alive connection stays open; keep it above the ALB's idle timeout
    /// (60 s), which reuses connections to the task (1..=3600)
    #[arg(long, env = "HTTP_HEADER_TIMEOUT_SECONDS", value_name = "SECONDS", default_value = "65",
          value_parser = ranged("HTTP_HEADER_TIMEOUT_SECONDS", 1, 3600, "seconds"))]
    pub http_header_timeout_seconds: u64,

    /// After SIGTERM, how long clients get to leave once told to, in seconds, before
    /// protection is released and the process exits; keep it below the task's stop
    /// timeout (0..=3600)
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", value_name = "SECONDS", default_value = "20",
          value_parser = ranged("SHUTDOWN_GRACE_SECONDS", 0, MAX_GRACE_SECONDS, "seconds"))]
    pub shutdown_grace_seconds: u64,

    /// Most clients told to leave per second, at shutdown and when the task leaves its
    /// service, so that they arrive at the other tasks in a steady stream; at shutdown
    /// the goodbye still ends within the first half of SHUTDOWN_GRACE_SECONDS
    /// (1..=1000000)
    #[arg(long, env = "GOODBYE_RATE", value_name = "CLIENTS", default_value = "1000",
          value_parser = ranged("GOODBYE_RATE", 1, 1_000_000, "clients per second"))]
    pub goodbye_rate: u64,

    /// Once the service no longer wants this task (DRAIN), how long its clients stay
    /// before they are told to reconnect, in seconds; none when ECS is already stopping
    /// the task. /healthz stays green meanwhile (ECS replaces a task whose check
    /// fails), so new clients the load balancer still sends here are refused with 503
    /// and Retry-After (0..=600)
    #[arg(long, env = "DRAIN_NOTICE_SECONDS", value_name = "SECONDS", default_value = "0",
          value_parser = ranged("DRAIN_NOTICE_SECONDS", 0, 600, "seconds"))]
    pub drain_notice_seconds: u64,

    /// Log output: text or json
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Task protection settings.
    #[command(flatten)]
    pub protection: ProtectionArgs,

    /// Metrics settings.
    #[command(flatten)]
    pub metrics: MetricsArgs,

    /// Drain settings.
    #[command(flatten)]
    pub drain: DrainArgs,
}

/// What the binary can do besides serving.
#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Command {
    /// Asks the server on PORT for /healthz and exits 0 when it answers 200, 1
    /// otherwise; for a container health check without curl
    Healthcheck {
        /// How long to wait for the answer, in seconds (1..=60)
        #[arg(long, value_name = "SECONDS", default_value = "3",
              value_parser = ranged("--timeout-seconds", 1, 60, "seconds"))]
        timeout_seconds: u64,
    },
}

/// This service's protection defaults: protect for 30 minutes, release as soon as the
/// last client leaves (maintain 0 %), refresh at 80 %, and wait at most 10 s between
/// attempts.
///
/// Clients stay for minutes to hours, so a long duration costs few refresh PUTs; an
/// idle task that stays protected blocks deployments, so nothing is kept after the
/// last client.
#[must_use]
pub fn protection_defaults() -> ProtectionSettings {
    ProtectionSettings::builder()
        .duration_minutes(30)
        .maintain_percent(0)
        .refresh_percent(80)
        .check_interval(Duration::from_secs(10))
        .build()
        .unwrap_or_default()
}

/// One entry of `ALLOWED_ORIGINS`, as a browser sends it in `Origin`: scheme, host
/// and optional port, lower case, without a path.
fn parse_origin(raw: &str) -> Result<String, String> {
    let origin = raw.trim().trim_end_matches('/').to_ascii_lowercase();
    let host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    match host {
        Some(host) if !host.is_empty() && !host.contains(['/', '?', '#', ' ', '@']) => Ok(origin),
        _ => Err(format!(
            "ALLOWED_ORIGINS={raw:?} is not an origin: expected scheme://host[:port], such as https://app.example.com"
        )),
    }
}

/// The server's own settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Where to listen; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Most clients at once.
    pub max_connections: usize,
    /// Time clients get to leave after SIGTERM.
    pub shutdown_grace: Duration,
    /// Time between the server's pings to each client.
    pub ping_interval: Duration,
    /// What one client may make the server hold.
    pub limits: Limits,
    /// Origins allowed to open a websocket; empty: any.
    pub allowed_origins: Vec<String>,
    /// Time a client gets to send request headers, and idle keep-alive lasts.
    pub header_timeout: Duration,
    /// Once leaving, how long clients stay before they are told to reconnect.
    pub drain_notice: Duration,
    /// Most clients told to leave per second.
    pub goodbye_rate: u32,
}

impl Default for ServerSettings {
    /// The defaults of `--help`, on 127.0.0.1 and a free port.
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            max_connections: 10_000,
            shutdown_grace: Duration::from_secs(20),
            ping_interval: Duration::from_secs(25),
            limits: Limits::default(),
            allowed_origins: Vec::new(),
            header_timeout: Duration::from_secs(65),
            drain_notice: Duration::ZERO,
            goodbye_rate: crate::app::GOODBYE_RATE,
        }
    }
}

impl Config {
    /// The server settings these arguments describe.
    #[must_use]
    pub fn server_settings(&self) -> ServerSettings {
        let port = u16::try_from(self.port).unwrap_or(u16::MAX);
        ServerSettings {
            listen: SocketAddr::new(self.bind_address, port),
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
            ping_interval: Duration::from_secs(self.ws_ping_interval_seconds),
            limits: Limits {
                max_message_bytes: usize::try_from(self.max_message_bytes).unwrap_or(usize::MAX),
                max_lifetime: (self.max_connection_lifetime_seconds > 0)
                    .then(|| Duration::from_secs(self.max_connection_lifetime_seconds)),
            },
            allowed_origins: self.allowed_origins.clone(),
            header_timeout: Duration::from_secs(self.http_header_timeout_seconds),
            drain_notice: Duration::from_secs(self.drain_notice_seconds),
            goodbye_rate: u32::try_from(self.goodbye_rate).unwrap_or(u32::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let cmd = ProtectionArgs::with_defaults(
            <Config as clap::CommandFactory>::command(),
            &protection_defaults(),
        );
        let matches =
            cmd.try_get_matches_from(std::iter::once("websocket").chain(args.iter().copied()))?;
        <Config as clap::FromArgMatches>::from_arg_matches(&matches)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let config = parse(&[]).unwrap();
        let s = config.server_settings();
        assert_eq!(s.listen.port(), 3000);
        assert_eq!(s.max_connections, 10_000);
        assert_eq!(s.shutdown_grace, Duration::from_secs(20));
        assert_eq!(s.ping_interval, Duration::from_secs(25));
        // The binary's one difference from the library's defaults: a deployed
        // server gives each connection an hour (see MAX_CONNECTION_LIFETIME_SECONDS).
        let library = ServerSettings::default();
        assert_eq!(
            s,
            ServerSettings {
                listen: s.listen,
                limits: Limits {
                    max_lifetime: Some(Duration::from_secs(3600)),
                    ..library.limits
                },
                ..library
            }
        );
        let p = config.protection.settings().unwrap();
        assert_eq!(p.duration_minutes(), 30);
        assert_eq!(p.maintain_percent(), 0);
        assert_eq!(p.refresh_percent(), 80);
        assert_eq!(p.check_interval(), Duration::from_secs(10));
    }

    #[test]
    fn out_of_range_values_name_the_variable() {
        let err = parse(&["--ws-ping-interval-seconds", "0"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("WS_PING_INTERVAL_SECONDS=0 is out of range"),
            "{err}"
        );
        let err = parse(&["--port", "70000"]).unwrap_err();
        assert!(
            err.to_string().contains("PORT=70000 is out of range"),
            "{err}"
        );
        let err = parse(&["--max-connections", "many"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("MAX_CONNECTIONS=\"many\" is not valid"),
            "{err}"
        );
    }

    #[test]
    fn allowed_origins_are_a_list_of_origins() {
        let config = parse(&[
            "--allowed-origins",
            "https://App.example.com/,http://localhost:3000",
        ])
        .unwrap();
        assert_eq!(
            config.server_settings().allowed_origins,
            ["https://app.example.com", "http://localhost:3000"]
        );
        let err = parse(&["--allowed-origins", "app.example.com"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("ALLOWED_ORIGINS=\"app.example.com\" is not an origin"),
            "{err}"
        );
        let err = parse(&["--allowed-origins", "https://app.example.com/page"]).unwrap_err();
        assert!(err.to_string().contains("is not an origin"), "{err}");
    }

    #[test]
    fn connections_live_an_hour_by_default() {
        // Unlimited by default, an open page kept its task protected, and so held
        // a deployment, for as long as it stayed open.
        let config = parse(&[]).unwrap();
        assert_eq!(
            config.server_settings().limits.max_lifetime,
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn a_lifetime_of_0_means_none() {
        let config = parse(&["--max-connection-lifetime-seconds", "0"]).unwrap();
        assert_eq!(config.server_settings().limits.max_lifetime, None);
        let config = parse(&["--max-connection-lifetime-seconds", "3600"]).unwrap();
        assert_eq!(
            config.server_settings().limits.max_lifetime,
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn healthcheck_is_a_subcommand() {
        let config = parse(&["healthcheck"]).unwrap();
        assert!(matches!(
            config.command,
            Some(Command::Healthcheck { timeout_seconds: 3 })
        ));
    }
}
