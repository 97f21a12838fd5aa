//! What every service built on this crate needs besides protection: its settings as
//! clap arguments (`--help` shows each variable and its default), one-line config
//! errors with exit code 2, one logging setup, and one shutdown signal.

use std::time::Duration;

use clap::builder::{OsStr, Resettable};
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Command, CommandFactory, FromArgMatches};

use crate::backend::{BackendConfig, BackendKind};
use crate::drain::{CHECK_SECONDS_RANGE, Drain, DrainMode, DrainSettings, SETTLE_SECONDS_RANGE};
use crate::settings::{
    ACQUIRE_TIMEOUT_MS_RANGE, CHECK_INTERVAL_MS_RANGE, MIN_PUT_INTERVAL_MS_RANGE,
    ProtectionSettings, REQUEST_TIMEOUT_MS_RANGE, SettingsError, env, parse_duration_minutes,
    parse_in_range, parse_maintain_percent, parse_refresh_percent,
};

/// A clap value parser for a whole number in `lo..=hi` whose error names `variable`
/// (the environment variable) and the range, with `unit` (may be empty) after it.
pub fn ranged(
    variable: &'static str,
    lo: u64,
    hi: u64,
    unit: &'static str,
) -> impl Fn(&str) -> Result<u64, SettingsError> + Clone + Send + Sync + 'static {
    move |raw| parse_in_range(variable, raw, (lo, hi), unit)
}

fn millis(
    variable: &'static str,
    (lo, hi): (u64, u64),
) -> impl Fn(&str) -> Result<u64, SettingsError> + Clone + Send + Sync + 'static {
    ranged(variable, lo, hi, "ms")
}

/// The protection settings as command-line arguments, each also read from its
/// environment variable. Flatten it into a service's own `clap::Parser`, and set the
/// service's defaults with [`ProtectionArgs::with_defaults`].
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Task protection")]
pub struct ProtectionArgs {
    /// How long each acquire or refresh protects the task, in minutes (1..=2880)
    #[arg(long, env = env::DURATION_MINUTES, value_name = "MINUTES", default_value = "5",
          value_parser = parse_duration_minutes)]
    pub protection_duration_minutes: u16,

    /// Keep protection this share of the duration after the last successful PUT,
    /// so short jobs do not cost a PUT pair each (0..=100)
    #[arg(long, env = env::MAINTAIN_PERCENT, value_name = "PERCENT", default_value = "10",
          value_parser = parse_maintain_percent)]
    pub protection_maintain_percent: u8,

    /// Refresh a held protection once this share of the duration has passed; the
    /// refresh must leave the request timeout plus the spacing before the expiry
    /// (1..=99)
    #[arg(long, env = env::REFRESH_PERCENT, value_name = "PERCENT", default_value = "80",
          value_parser = parse_refresh_percent)]
    pub protection_refresh_percent: u8,

    /// Longest wait between attempts: the retry backoff cap and the cool-down after
    /// ECS refuses protection, in ms (100..=3600000)
    #[arg(long, env = env::CHECK_INTERVAL_MS, value_name = "MS", default_value = "10000",
          value_parser = millis(env::CHECK_INTERVAL_MS, CHECK_INTERVAL_MS_RANGE))]
    pub protection_check_interval_ms: u64,

    /// Least time between two protection PUTs, and without holders before a release,
    /// in ms; ECS rate-limits these calls per account. At most the time from an enable
    /// to its refresh, and at most the refresh's lead (what is left of the duration
    /// then) less the request timeout (0..=60000)
    #[arg(long, env = env::MIN_PUT_INTERVAL_MS, value_name = "MS", default_value = "1000",
          value_parser = millis(env::MIN_PUT_INTERVAL_MS, MIN_PUT_INTERVAL_MS_RANGE))]
    pub protection_min_put_interval_ms: u64,

    /// Timeout of one protection request, in ms; longer than the agent's own 4-5 s
    /// (1000..=120000)
    #[arg(long, env = env::REQUEST_TIMEOUT_MS, value_name = "MS", default_value = "8000",
          value_parser = millis(env::REQUEST_TIMEOUT_MS, REQUEST_TIMEOUT_MS_RANGE))]
    pub protection_request_timeout_ms: u64,

    /// How long to wait for ECS to confirm protection before giving up, in ms
    /// (100..=3600000)
    #[arg(long, env = env::ACQUIRE_TIMEOUT_MS, value_name = "MS", default_value = "30000",
          value_parser = millis(env::ACQUIRE_TIMEOUT_MS, ACQUIRE_TIMEOUT_MS_RANGE))]
    pub protection_acquire_timeout_ms: u64,

    /// Where protection calls go: auto (the ECS agent when ECS_AGENT_URI is set; a
    /// local simulation when no ECS variable is set; an error in a task whose agent
    /// lacks the endpoint), agent, ecs-api, or local
    #[arg(long = "task-protection-backend", env = BackendKind::ENV, value_enum,
          default_value_t = BackendKind::Auto)]
    pub backend: BackendKind,
}

impl ProtectionArgs {
    /// Sets the defaults shown by `--help` and used when a variable is unset.
    #[must_use]
    pub fn with_defaults(cmd: Command, defaults: &ProtectionSettings) -> Command {
        let ms = |d: Duration| d.as_millis().to_string();
        let values = [
            (
                "protection_duration_minutes",
                defaults.duration_minutes().to_string(),
            ),
            (
                "protection_maintain_percent",
                defaults.maintain_percent().to_string(),
            ),
            (
                "protection_refresh_percent",
                defaults.refresh_percent().to_string(),
            ),
            (
                "protection_check_interval_ms",
                ms(defaults.check_interval()),
            ),
            (
                "protection_min_put_interval_ms",
                ms(defaults.min_put_interval()),
            ),
            (
                "protection_request_timeout_ms",
                ms(defaults.request_timeout()),
            ),
            (
                "protection_acquire_timeout_ms",
                ms(defaults.acquire_timeout()),
            ),
        ];
        values.into_iter().fold(cmd, |cmd, (id, value)| {
            cmd.mut_arg(id, |a| {
                a.default_value(Resettable::Value(OsStr::from(value)))
            })
        })
    }

    /// The settings these arguments describe.
    ///
    /// # Errors
    /// When a value is out of range (the parsers already check each one).
    pub fn settings(&self) -> Result<ProtectionSettings, SettingsError> {
        ProtectionSettings::builder()
            .duration_minutes(self.protection_duration_minutes)
            .maintain_percent(self.protection_maintain_percent)
            .refresh_percent(self.protection_refresh_percent)
            .check_interval(Duration::from_millis(self.protection_check_interval_ms))
            .min_put_interval(Duration::from_millis(self.protection_min_put_interval_ms))
            .request_timeout(Duration::from_millis(self.protection_request_timeout_ms))
            .acquire_timeout(Duration::from_millis(self.protection_acquire_timeout_ms))
            .build()
    }

    /// The backend choice, with `ECS_AGENT_URI` and `ECS_CONTAINER_METADATA_URI_V4`
    /// read from the environment.
    #[must_use]
    pub fn backend_config(&self) -> BackendConfig {
        BackendConfig::from_env_with_kind(self.backend)
    }
}

/// Parses the process arguments and environment into `T`, after `customize` has set
/// the service's defaults. On a bad value it prints one line to stderr and exits 2;
/// `--help` and `--version` print and exit 0.
pub fn parse_or_exit<T: FromArgMatches + CommandFactory>(
    customize: impl FnOnce(Command) -> Command,
) -> T {
    let mut cmd = customize(T::command());
    let parsed = cmd
        .try_get_matches_from_mut(std::env::args_os())
        .and_then(|m| T::from_arg_matches(&m));
    parsed.unwrap_or_else(|e| exit_with_clap_error(&e, &cmd))
}

/// Prints `err` as one line and exits: 0 for help and version, 2 otherwise.
pub fn exit_with_clap_error(err: &clap::Error, cmd: &Command) -> ! {
    if matches!(
        err.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        err.exit()
    }
    exit_config_error(cmd.get_name(), &one_line(err, cmd))
}

/// Prints `{program}: error: {message}` as one line on stderr and exits 2.
pub fn exit_config_error(program: &str, message: &str) -> ! {
    eprintln!("{program}: error: {message}");
    std::process::exit(2)
}

/// clap's error in one line: the problem, without the usage and tip lines, and with
/// the environment variable of a missing argument named.
fn one_line(err: &clap::Error, cmd: &Command) -> String {
    let rendered = err.render().to_string();
    let mut text = rendered
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with("Usage:") && !l.starts_with("For more information")
        })
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(rest) = text.strip_prefix("error: ") {
        text = rest.to_owned();
    }
    if err.kind() == ErrorKind::MissingRequiredArgument
        && let Some(ContextValue::Strings(missing)) = err.get(ContextKind::InvalidArg)
    {
        {
            let vars: Vec<String> = missing
                .iter()
                .filter_map(|m| {
                    cmd.get_arguments().find_map(|a| {
                        let long = a.get_long()?;
                        let matches =
                            m.starts_with(&format!("--{long} ")) || m == &format!("--{long}");
                        matches
                            .then(|| a.get_env())?
                            .map(|e| e.to_string_lossy().into_owned())
                    })
                })
                .collect();
            if !vars.is_empty() {
                text.push_str(&format!(" (set {})", vars.join(", ")));
            }
        }
    }
    text
}

/// Log output format: the value of `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for CloudWatch Logs Insights.
    Json,
}

/// Sets up tracing once for the process: `RUST_LOG` filters (default `info`).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only on a terminal: ECS ships stdout to CloudWatch as text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stdout);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// A shutdown signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM: ECS is stopping the task.
    Term,
    /// SIGINT: ctrl-c.
    Interrupt,
}

impl Signal {
    /// `SIGTERM` or `SIGINT`.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Term => "SIGTERM",
            Self::Interrupt => "SIGINT",
        }
    }
}

/// Starts listening for SIGTERM and SIGINT; each one received is sent on the channel,
/// for as long as the receiver lives. ECS sends SIGTERM once; an operator at a
/// terminal may press ctrl-c twice, and the second one means "now".
///
/// # Panics
/// Outside a tokio runtime.
#[must_use]
pub fn signals() -> tokio::sync::mpsc::UnboundedReceiver<Signal> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        for (kind, which) in [
            (SignalKind::terminate(), Signal::Term),
            (SignalKind::interrupt(), Signal::Interrupt),
        ] {
            let tx = tx.clone();
            match signal(kind) {
                Ok(mut stream) => {
                    tokio::spawn(async move {
                        while stream.recv().await.is_some() {
                            if tx.send(which).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(e) => tracing::warn!("cannot listen for {}: {e}", which.name()),
            }
        }
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if tx.send(Signal::Interrupt).is_err() {
                break;
            }
        }
    });
    rx
}

/// Where metrics go: the value of `METRICS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum MetricsMode {
    /// `emf` inside ECS (where `ECS_CONTAINER_METADATA_URI_V4` or `ECS_AGENT_URI` is
    /// set), `off` elsewhere.
    #[default]
    Auto,
    /// CloudWatch Embedded Metric Format lines on stdout every interval.
    Emf,
    /// No metrics.
    Off,
}

fn namespace(raw: &str) -> Result<String, SettingsError> {
    metrics_emf::check_namespace(raw)
        .map(|()| raw.to_owned())
        .map_err(|reason| SettingsError::Invalid {
            name: "METRICS_NAMESPACE",
            value: raw.to_owned(),
            reason,
        })
}

/// A value for the dimension `name`, as CloudWatch accepts it: 1 to 1024 ASCII
/// characters, not only whitespace, no control characters.
fn dimension(
    variable: &'static str,
    name: &'static str,
) -> impl Fn(&str) -> Result<String, SettingsError> + Clone {
    move |raw| {
        metrics_emf::check_dimension(name, raw)
            .map(|()| raw.to_owned())
            .map_err(|reason| SettingsError::Invalid {
                name: variable,
                value: raw.to_owned(),
                reason,
            })
    }
}

/// The metrics settings as command-line arguments, shared by every service.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Metrics")]
pub struct MetricsArgs {
    /// Where metrics go: auto (emf inside ECS, off elsewhere), emf (CloudWatch
    /// Embedded Metric Format lines on stdout every interval), or off
    #[arg(long, env = "METRICS", value_enum, default_value_t = MetricsMode::Auto)]
    pub metrics: MetricsMode,

    /// Seconds between two metrics lines (1..=3600)
    #[arg(long, env = "METRICS_INTERVAL_SECONDS", value_name = "SECONDS", default_value = "60",
          value_parser = ranged("METRICS_INTERVAL_SECONDS", 1, 3600, "seconds"))]
    pub metrics_interval_seconds: u64,

    /// CloudWatch namespace of the metrics
    #[arg(long, env = "METRICS_NAMESPACE", value_name = "NAMESPACE",
          default_value = "ECSTaskProtection", value_parser = namespace)]
    pub metrics_namespace: String,

    /// The Service dimension; unset: COPILOT_SERVICE_NAME, else the program's name
    #[arg(long, env = "METRICS_SERVICE", value_name = "NAME",
          value_parser = dimension("METRICS_SERVICE", "Service"))]
    pub metrics_service: Option<String>,

    /// The Environment dimension; unset: COPILOT_ENVIRONMENT_NAME, else none
    #[arg(long, env = "METRICS_ENVIRONMENT", value_name = "NAME",
          value_parser = dimension("METRICS_ENVIRONMENT", "Environment"))]
    pub metrics_environment: Option<String>,
}

impl MetricsArgs {
    /// The EMF configuration, or `None` when metrics are off. `program` names the
    /// service when neither `METRICS_SERVICE` nor `COPILOT_SERVICE_NAME` does.
    #[must_use]
    pub fn emf_config(&self, program: &str) -> Option<metrics_emf::EmfConfig> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let on = match self.metrics {
            MetricsMode::Emf => true,
            MetricsMode::Off => false,
            MetricsMode::Auto => {
                var("ECS_CONTAINER_METADATA_URI_V4").is_some() || var("ECS_AGENT_URI").is_some()
            }
        };
        if !on {
            return None;
        }
        let service = self
            .metrics_service
            .clone()
            .or_else(|| var("COPILOT_SERVICE_NAME"))
            .unwrap_or_else(|| program.to_owned());
        let environment = self
            .metrics_environment
            .clone()
            .or_else(|| var("COPILOT_ENVIRONMENT_NAME"))
            .unwrap_or_default();
        // The parsers checked the namespace and the interval; should the two ever
        // disagree, metrics are off with a warning rather than the service down.
        metrics_emf::EmfConfig::builder(self.metrics_namespace.clone())
            .interval(Duration::from_secs(self.metrics_interval_seconds))
            .dimension("Service", service)
            .dimension("Environment", environment)
            .build()
            .inspect_err(|e| tracing::warn!("EMF metrics are off: {e}"))
            .ok()
    }

    /// Installs the EMF recorder as the process's `metrics` recorder and starts
    /// writing a line every interval. Returns the handle to write the last line at
    /// exit, or `None` when metrics are off (or another recorder is installed).
    #[must_use]
    pub fn install(&self, program: &str) -> Option<metrics_emf::EmfHandle> {
        let config = self.emf_config(program)?;
        let recorder = metrics_emf::EmfRecorder::new(config);
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder is already installed; EMF metrics are off");
            return None;
        }
        tokio::spawn(handle.clone().run(std::future::pending()));
        Some(handle)
    }
}

/// The drain watcher's settings as command-line arguments, each also read from its
/// environment variable.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Drain")]
pub struct DrainArgs {
    /// Whether to ask ECS if the service still wants this task, and leave (take no new
    /// work, let protection go) when it does not: auto (on inside ECS, where
    /// ECS_CONTAINER_METADATA_URI_V4 is set) or off
    #[arg(long, env = "DRAIN", value_enum, default_value_t = DrainMode::Auto)]
    pub drain: DrainMode,

    /// Mean seconds between two decisions, each jittered by ±50 %: one per service when
    /// DRAIN_TABLE is set, one per task otherwise. A decision is one DescribeServices
    /// call, and ListTasks and DescribeTasks while the service moves (1..=3600)
    #[arg(long, env = "DRAIN_CHECK_SECONDS", value_name = "SECONDS", default_value = "30",
          value_parser = ranged("DRAIN_CHECK_SECONDS", CHECK_SECONDS_RANGE.0, CHECK_SECONDS_RANGE.1, "seconds"))]
    pub drain_check_seconds: u64,

    /// Seconds a new deployment's task must have run, past the service's health check
    /// grace period, before an old task leaves for it: at least the load balancer's
    /// unhealthy threshold times its interval (0..=3600)
    #[arg(long, env = "DRAIN_SETTLE_SECONDS", value_name = "SECONDS", default_value = "30",
          value_parser = ranged("DRAIN_SETTLE_SECONDS", SETTLE_SECONDS_RANGE.0, SETTLE_SECONDS_RANGE.1, "seconds"))]
    pub drain_settle_seconds: u64,

    /// A DynamoDB table (partition key `service`, a string) through which the service's
    /// tasks share one decision, so that its ECS calls do not grow with its tasks;
    /// unset, each task decides for itself (services of up to 50 tasks)
    #[arg(long, env = "DRAIN_TABLE", value_name = "TABLE")]
    pub drain_table: Option<String>,

    /// The ECS service's name; unset, each task asks ECS once (DescribeTasks on itself)
    #[arg(long, env = "DRAIN_SERVICE", value_name = "NAME")]
    pub drain_service: Option<String>,
}

impl DrainArgs {
    /// The settings these arguments describe.
    ///
    /// # Errors
    /// A table or service name the drain cannot use.
    pub fn settings(&self) -> Result<DrainSettings, crate::drain::DrainSettingsError> {
        let mut builder = DrainSettings::builder()
            .check_interval(Duration::from_secs(self.drain_check_seconds))
            .settle(Duration::from_secs(self.drain_settle_seconds));
        if let Some(table) = self.drain_table.as_deref().filter(|t| !t.trim().is_empty()) {
            builder = builder.table(table.trim());
        }
        if let Some(service) = self
            .drain_service
            .as_deref()
            .filter(|s| !s.trim().is_empty())
        {
            builder = builder.service(service.trim());
        }
        builder.build()
    }

    /// The watcher these arguments describe, started; off outside ECS.
    ///
    /// # Errors
    /// A table or service name the drain cannot use.
    pub async fn start(&self) -> Result<Drain, crate::drain::DrainSettingsError> {
        let settings = self.settings()?;
        let metadata = std::env::var("ECS_CONTAINER_METADATA_URI_V4")
            .ok()
            .filter(|v| !v.trim().is_empty());
        Ok(Drain::start(self.drain, metadata.as_deref(), settings).await)
    }
}
