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

use crate::admission::Origins;
use crate::connection::limits::{Limits, LimitsError};

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
/// The largest budget of frames a second that may be configured.
pub const MAX_FRAMES_PER_SECOND_LIMIT: u64 = 1_000_000;
/// The largest budget of bytes a second that may be configured: a gibibyte.
pub const MAX_BYTES_PER_SECOND_LIMIT: u64 = 1024 * 1024 * 1024;

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

    /// TCP port to listen on; the page, the websocket, /healthz and /status share it;
    /// 0: a free port the system picks, written in the log (0..=65535)
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

    /// Origins whose pages may open a websocket, comma-separated: origins such as
    /// https://app.example.com, or hosts such as app.example.com (either scheme); a
    /// browser's upgrade from any other page gets HTTP 403. Unset: pages from any
    /// site may connect, and each connection holds the task's protection (said once
    /// at start). The deployment files set the load balancer's own address
    #[arg(long, env = "ALLOWED_ORIGINS", value_name = "ORIGINS", value_parser = Origins::parse)]
    pub allowed_origins: Option<Origins>,

    /// Most clients at once from one address; past it its new clients get HTTP 429.
    /// Behind a load balancer every client comes from its addresses: set
    /// TRUST_X_FORWARDED_FOR too, so that clients are counted by the address it
    /// appends to X-Forwarded-For. IPv6 clients are counted by their /64. Unset: no
    /// limit (the deployment files set 100) (1..=1000000)
    #[arg(long, env = "MAX_CONNECTIONS_PER_ADDRESS", value_name = "N",
          value_parser = ranged("MAX_CONNECTIONS_PER_ADDRESS", 1, MAX_CONNECTIONS_LIMIT, ""))]
    pub max_connections_per_address: Option<u64>,

    /// true: count a client under the address the load balancer appended to
    /// X-Forwarded-For (its last entry) instead of the connection's peer. Only behind
    /// a load balancer that sets it, as the ALB does: a client reaching the server
    /// directly could write any address there. Unset or false: the peer (the
    /// deployment files set true)
    #[arg(long, env = "TRUST_X_FORWARDED_FOR", value_name = "BOOL",
          value_parser = boolean("TRUST_X_FORWARDED_FOR"), action = clap::ArgAction::Set)]
    pub trust_x_forwarded_for: Option<bool>,

    /// Most frames of any type (text, binary, ping, pong) one client may send in a
    /// second; past it the connection is closed with 1008. At the default a client
    /// costs at most about 1 % of a core (BENCHMARKS.md) (10..=1000000)
    #[arg(long, env = "MAX_FRAMES_PER_SECOND", value_name = "FRAMES", default_value = "1000",
          value_parser = ranged("MAX_FRAMES_PER_SECOND", 10, MAX_FRAMES_PER_SECOND_LIMIT, "frames"))]
    pub max_frames_per_second: u64,

    /// Most payload bytes one client may send in a second; past it the connection
    /// is closed with 1008. At least MAX_MESSAGE_BYTES (1024..=1073741824)
    #[arg(long, env = "MAX_BYTES_PER_SECOND", value_name = "BYTES", default_value = "1048576",
          value_parser = ranged("MAX_BYTES_PER_SECOND", 1024, MAX_BYTES_PER_SECOND_LIMIT, "bytes"))]
    pub max_bytes_per_second: u64,

    /// Show the task's ARN, and the ARNs and account numbers in protection errors, on
    /// /status, which answers anyone who can load the page (true or false)
    #[arg(long, env = "STATUS_SHOW_IDENTIFIERS", value_name = "BOOL", default_value = "false",
          value_parser = boolean("STATUS_SHOW_IDENTIFIERS"), action = clap::ArgAction::Set)]
    pub status_show_identifiers: bool,

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

/// A setting that is `true` or `false`, named in the error.
fn boolean(variable: &'static str) -> impl Fn(&str) -> Result<bool, String> + Clone + Send + Sync {
    move |raw| match raw.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!(
            "{variable}={raw:?} is not valid: expected true or false"
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
    /// Most clients at once from one address; 0: no limit (the default).
    pub max_connections_per_address: usize,
    /// Count clients by the load balancer's `X-Forwarded-For`, not by the peer.
    pub trust_forwarded_for: bool,
    /// Time clients get to leave after SIGTERM.
    pub shutdown_grace: Duration,
    /// Time between the server's pings to each client.
    pub ping_interval: Duration,
    /// What one client may make the server hold.
    pub limits: Limits,
    /// The pages allowed to open a websocket.
    pub origins: Origins,
    /// `/status` names the task.
    pub show_identifiers: bool,
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
            max_connections_per_address: 0,
            trust_forwarded_for: false,
            shutdown_grace: Duration::from_secs(20),
            ping_interval: Duration::from_secs(25),
            limits: Limits::default(),
            origins: Origins::any(),
            show_identifiers: false,
            header_timeout: Duration::from_secs(65),
            drain_notice: Duration::ZERO,
            goodbye_rate: crate::app::GOODBYE_RATE,
        }
    }
}

impl Config {
    /// The server settings these arguments describe.
    ///
    /// # Errors
    /// When the limits cannot work together, e.g. a byte budget below the largest
    /// message.
    pub fn server_settings(&self) -> Result<ServerSettings, LimitsError> {
        let port = u16::try_from(self.port).unwrap_or(u16::MAX);
        let limits = Limits {
            max_message_bytes: usize::try_from(self.max_message_bytes).unwrap_or(usize::MAX),
            max_lifetime: (self.max_connection_lifetime_seconds > 0)
                .then(|| Duration::from_secs(self.max_connection_lifetime_seconds)),
            max_frames_per_second: u32::try_from(self.max_frames_per_second).unwrap_or(u32::MAX),
            max_bytes_per_second: self.max_bytes_per_second,
        };
        limits.validate()?;
        Ok(ServerSettings {
            listen: SocketAddr::new(self.bind_address, port),
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            max_connections_per_address: self
                .max_connections_per_address
                .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX)),
            trust_forwarded_for: self.trust_x_forwarded_for.unwrap_or(false),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_seconds),
            ping_interval: Duration::from_secs(self.ws_ping_interval_seconds),
            limits,
            origins: self.allowed_origins.clone().unwrap_or_default(),
            show_identifiers: self.status_show_identifiers,
            header_timeout: Duration::from_secs(self.http_header_timeout_seconds),
            drain_notice: Duration::from_secs(self.drain_notice_seconds),
            goodbye_rate: u32::try_from(self.goodbye_rate).unwrap_or(u32::MAX),
        })
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
        let s = config.server_settings().unwrap();
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
            config.server_settings().unwrap().origins.entries(),
            ["https://app.example.com", "http://localhost:3000"]
        );
        // A bare host, as a load balancer's DNS name comes: either scheme.
        let config = parse(&["--allowed-origins", "Name-1.elb.amazonaws.com"]).unwrap();
        assert_eq!(
            config.server_settings().unwrap().origins.entries(),
            ["name-1.elb.amazonaws.com"]
        );
        let err = parse(&["--allowed-origins", "ftp://app.example.com"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("ALLOWED_ORIGINS=\"ftp://app.example.com\" is not an origin"),
            "{err}"
        );
        let err = parse(&["--allowed-origins", "https://app.example.com/page"]).unwrap_err();
        assert!(err.to_string().contains("is not an origin"), "{err}");
    }

    #[test]
    fn strangers_and_floods_are_limited_by_default() {
        let s = parse(&[]).unwrap().server_settings().unwrap();
        assert_eq!(s.max_connections_per_address, 0, "unset: no limit");
        assert!(!s.trust_forwarded_for);
        assert!(!s.show_identifiers);
        assert!(s.origins.is_any(), "unset: said at start, and open");
        assert_eq!(s.limits.max_frames_per_second, 1_000);
        assert_eq!(s.limits.max_bytes_per_second, 1024 * 1024);
        let s = parse(&[
            "--trust-x-forwarded-for",
            "true",
            "--status-show-identifiers",
            "TRUE",
            "--max-connections-per-address",
            "100",
        ])
        .unwrap()
        .server_settings()
        .unwrap();
        assert!(s.trust_forwarded_for && s.show_identifiers);
        assert_eq!(s.max_connections_per_address, 100);
        assert!(parse(&["--max-connections-per-address", "0"]).is_err());
        let err = parse(&["--trust-x-forwarded-for", "yes"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("TRUST_X_FORWARDED_FOR=\"yes\" is not valid"),
            "{err}"
        );
    }

    #[test]
    fn the_byte_budget_must_hold_the_largest_message() {
        let config = parse(&[
            "--max-message-bytes",
            "65536",
            "--max-bytes-per-second",
            "4096",
        ])
        .unwrap();
        let err = config.server_settings().unwrap_err();
        assert!(
            err.to_string()
                .contains("MAX_BYTES_PER_SECOND=4096 is below MAX_MESSAGE_BYTES=65536"),
            "{err}"
        );
        let err = parse(&["--max-frames-per-second", "5"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("MAX_FRAMES_PER_SECOND=5 is out of range"),
            "{err}"
        );
    }

    #[test]
    fn connections_live_an_hour_by_default() {
        // Unlimited by default, an open page kept its task protected, and so held
        // a deployment, for as long as it stayed open.
        let config = parse(&[]).unwrap();
        assert_eq!(
            config.server_settings().unwrap().limits.max_lifetime,
            Some(Duration::from_secs(3600))
        );
    }

    #[test]
    fn a_lifetime_of_0_means_none() {
        let config = parse(&["--max-connection-lifetime-seconds", "0"]).unwrap();
        assert_eq!(config.server_settings().unwrap().limits.max_lifetime, None);
        let config = parse(&["--max-connection-lifetime-seconds", "3600"]).unwrap();
        assert_eq!(
            config.server_settings().unwrap().limits.max_lifetime,
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
