//! Running short of file descriptors: said once at start-up, and the clients already
//! connected are still served.

use std::time::Duration;

use e2e::agent::FakeAgent;
use e2e::wait_for;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

use super::{STEP, env, next_text};

/// The server under a low open-file limit, set for the child alone with `prlimit`
/// (util-linux); its output lines are collected.
struct Limited {
    child: tokio::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Limited {
    fn count(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    async fn wait_for_line(&self, needle: &str) -> String {
        wait_for(&format!("a line with {needle:?}"), STEP, || async {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.contains(needle))
                .cloned()
        })
        .await
    }
}

fn start_limited(agent: &FakeAgent, open_files: u32, extra: &[(&str, String)]) -> Limited {
    start_limited_soft(agent, (open_files, open_files), extra)
}

fn start_limited_soft(
    agent: &FakeAgent,
    (soft, hard): (u32, u32),
    extra: &[(&str, String)],
) -> Limited {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new("prlimit")
        .arg(format!("--nofile={soft}:{hard}"))
        .arg("--")
        .arg(e2e::process::binary("websocket"))
        .env_clear()
        .envs(env(agent, 0))
        .envs(extra.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("prlimit starts the server");
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    for stream in [
        Box::new(out) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(err),
    ] {
        let lines = std::sync::Arc::clone(&lines);
        tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(stream).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                eprintln!("[websocket] {line}");
                lines.lock().unwrap().push(line);
            }
        });
    }
    Limited { child, lines }
}

#[tokio::test]
async fn websocket_low_open_file_limit_is_named_at_start_up() {
    let agent = FakeAgent::start().await;
    let mut server = start_limited(&agent, 256, &[]);
    let line = server.wait_for_line("open-file limit is").await;
    assert!(
        line.contains("256") && line.contains("MAX_CONNECTIONS=10000"),
        "{line}"
    );
    server.wait_for_line("Listening on").await;
    assert_eq!(server.count("open-file limit is"), 1);
    let _ = server.child.kill().await;

    // A soft limit below the hard one is raised to it, and then 1,000 clients fit.
    let mut server = start_limited_soft(
        &agent,
        (256, 2048),
        &[("MAX_CONNECTIONS", "1000".to_owned())],
    );
    server.wait_for_line("Listening on").await;
    let pid = server.child.id().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .split_whitespace()
        .nth(3)
        .unwrap_or_default()
        .to_owned();
    assert_eq!(open_files, "2048", "{limits}");
    assert_eq!(server.count("open-file limit is"), 0);
    let _ = server.child.kill().await;
}

#[tokio::test]
async fn websocket_out_of_file_descriptors_keeps_serving_and_accepts_again() {
    const OPEN_FILES: u32 = 48;
    let agent = FakeAgent::start().await;
    let mut server = start_limited(&agent, OPEN_FILES, &[]);
    let line = server.wait_for_line("Listening on").await;
    let port = e2e::bench::listening_port(&line).unwrap_or_else(|| panic!("no port in {line:?}"));
    let url = format!("ws://127.0.0.1:{port}/");
    // Connect until the server runs out of descriptors: a client then waits in the
    // listen backlog, unanswered.
    let mut open = Vec::new();
    let waiting = loop {
        let mut connecting = tokio::spawn(connect_async(url.clone()));
        let out_of_files = async {
            server.wait_for_line("Cannot accept connections").await;
        };
        tokio::select! {
            result = &mut connecting => {
                let (mut ws, _) = result.unwrap().expect("admitted");
                next_text(&mut ws).await;
                open.push(ws);
                assert!(open.len() < OPEN_FILES as usize, "never ran out");
            }
            () = out_of_files => break connecting,
        }
    };
    let mut more = Vec::new();
    for _ in 0..3 {
        more.push(tokio::spawn(connect_async(url.clone())));
    }
    // The clients it has are still served.
    let first = open.first_mut().expect("some clients were admitted");
    first.send(Message::text("ping")).await.unwrap();
    assert_eq!(next_text(first).await, "pong");
    // Said once for the whole burst, not at each retry (every 100 ms).
    let again = tokio::time::timeout(Duration::from_millis(500), async {
        while server.count("Cannot accept connections") < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(again.is_err(), "said again at a retry");
    // Clients leave; the waiting ones are accepted.
    for mut ws in open.drain(..8) {
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }
    for pending in std::iter::once(waiting).chain(more) {
        let (mut ws, _) = tokio::time::timeout(STEP, pending)
            .await
            .expect("accepted once descriptors are free")
            .unwrap()
            .expect("admitted");
        assert!(next_text(&mut ws).await.starts_with("Welcome!"));
    }
    server.wait_for_line("Accepting connections again").await;
    let _ = server.child.kill().await;
}
