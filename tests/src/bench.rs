//! What the benchmarks share: starting a release-built server and finding its port,
//! and reading a process's memory and CPU from `/proc`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The benchmarks' error type.
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// A binary beside the running one: a benchmark built with `--release` finds the
/// release-built services in its own directory.
#[must_use]
pub fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_default()
        .join(name)
}

/// The port in a service's `Listening on ADDRESS` line, text or JSON logs: the
/// address ends at the first character that is not part of it (a space in a text
/// log, a quote in a JSON one).
#[must_use]
pub fn listening_port(line: &str) -> Option<u16> {
    let rest = line.split("Listening on ").nth(1)?;
    let addr = rest
        .split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .next()?;
    addr.rsplit(':').next()?.parse().ok()
}

/// Starts `binary` with only `env` (and `PORT=0`), waits up to `within` for its
/// `Listening on` line, and keeps draining its output so its logging never blocks
/// on a full pipe. Returns the child and the port it listens on.
///
/// # Errors
/// When the binary cannot start, or exits or stays silent before it listens.
pub async fn start_listening<K, V>(
    binary: &Path,
    env: impl IntoIterator<Item = (K, V)>,
    within: Duration,
) -> Result<(Child, u16), Error>
where
    K: AsRef<OsStr>,
    V: AsRef<OsStr>,
{
    let mut child = Command::new(binary)
        .env_clear()
        .env("PORT", "0")
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            format!(
                "{}: {e}; build it first: cargo build --release -p websocket -p e2e --bins",
                binary.display()
            )
        })?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let port = tokio::time::timeout(within, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(port) = listening_port(&line) {
                return Ok::<u16, Error>(port);
            }
        }
        Err(format!("{} exited before listening", binary.display()).into())
    })
    .await??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, port))
}

/// Reading a process's figures from `/proc`.
pub mod procfs {
    /// A `NAME: N kB` line's number, from a `/proc` file such as `status` or `meminfo`.
    fn kb_field(text: &str, name: &str) -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// `VmRSS` of process `pid`, in KiB.
    #[must_use]
    pub fn rss_kb(pid: u32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        kb_field(&status, "VmRSS")
    }

    /// `VmHWM` of process `pid`: the most its resident set has been, in KiB, since
    /// it started or since [`reset_peak_rss`].
    #[must_use]
    pub fn peak_rss_kb(pid: u32) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        kb_field(&status, "VmHWM")
    }

    /// Sets the peak that [`peak_rss_kb`] reads to the resident set of now (Linux
    /// 4.0 and later).
    ///
    /// # Errors
    /// When `/proc/<pid>/clear_refs` cannot be written: another user's process, or
    /// an older kernel.
    pub fn reset_peak_rss(pid: u32) -> std::io::Result<()> {
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
    }

    /// User plus system CPU time of process `pid`, in clock ticks (1/100 s here).
    #[must_use]
    pub fn cpu_ticks(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces; the fields counted here follow its ')'.
        let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    }

    /// A machine-wide figure of `/proc/meminfo`, such as `Slab`, in KiB.
    #[must_use]
    pub fn meminfo_kb(name: &str) -> Option<u64> {
        kb_field(&std::fs::read_to_string("/proc/meminfo").ok()?, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_read_from_text_and_json_log_lines() {
        assert_eq!(
            listening_port(
                "2026-11-28T16:00:00Z  INFO websocket: Listening on 127.0.0.1:41234 port=41234"
            ),
            Some(41234)
        );
        assert_eq!(
            listening_port(r#"{"message":"Listening on 0.0.0.0:3000","port":3000}"#),
            Some(3000)
        );
        assert_eq!(listening_port("Listening soon"), None);
    }

    #[test]
    fn this_process_has_a_resident_set_and_cpu_time() {
        let pid = std::process::id();
        assert!(procfs::rss_kb(pid).is_some_and(|kb| kb > 0));
        let rss = procfs::rss_kb(pid).unwrap();
        assert!(procfs::peak_rss_kb(pid).is_some_and(|kb| kb >= rss));
        assert!(procfs::cpu_ticks(pid).is_some());
        assert!(procfs::meminfo_kb("MemTotal").is_some_and(|kb| kb > 0));
        assert_eq!(procfs::meminfo_kb("NoSuchField"), None);
    }
}
