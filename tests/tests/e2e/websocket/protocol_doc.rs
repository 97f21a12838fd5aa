//! `websocket/README.md` against the real server: its session transcripts are replayed,
//! its table of refused upgrades is provoked row by row, its `/status` example has the
//! fields the server answers with, and its metrics table names exactly the metrics a
//! server writes through a drain.

use std::collections::BTreeSet;
use std::time::Duration;

use e2e::agent::FakeAgent;
use e2e::sim::{SimConfig, Simulator};
use e2e::{wait_for, workspace_root};
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::{
    STEP, Server, Ws, client_frame, next_message, raw_upgrade, server_close_code, server_frame,
};

const README: &str = "websocket/README.md";

fn readme() -> String {
    let path = workspace_root().join(README);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The fenced blocks of `doc` whose info string is `lang`, each as its lines.
fn fenced(doc: &str, lang: &str) -> Vec<Vec<String>> {
    let opening = format!("```{lang}");
    let mut blocks = Vec::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        if line.trim_end() == opening {
            blocks.push(
                lines
                    .by_ref()
                    .take_while(|l| l.trim_end() != "```")
                    .map(str::to_owned)
                    .collect(),
            );
        }
    }
    blocks
}

/// The text of a Markdown code span: `` `x` `` or ``` `` `x` `` ```, without the
/// backticks and (as CommonMark strips it) one space on each side.
fn code_span(cell: &str) -> String {
    let cell = cell.trim();
    let ticks = cell.len() - cell.trim_start_matches('`').len();
    assert!(ticks > 0, "{README}: {cell:?} is not in backticks");
    let inner = cell[ticks..]
        .strip_suffix(&cell[..ticks])
        .unwrap_or_else(|| panic!("{README}: {cell:?} does not end as it begins"));
    match inner.strip_prefix(' ').and_then(|i| i.strip_suffix(' ')) {
        Some(stripped) if !stripped.trim().is_empty() => stripped.to_owned(),
        _ => inner.to_owned(),
    }
}

/// The body rows of the first table whose header row is `header`, as trimmed cells.
fn table(doc: &str, header: &str) -> Vec<Vec<String>> {
    let mut lines = doc.lines().skip_while(|l| l.trim() != header);
    assert!(
        lines.next().is_some(),
        "{README} has no table headed {header:?}"
    );
    lines
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            row.trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

// --- the transcripts ------------------------------------------------------------------

/// One message, as a transcript writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Said {
    /// A text message, exactly this text.
    Text(String),
    /// `[binary, N bytes]`.
    Binary(usize),
    /// `[close CODE "REASON"]`.
    Close(u16, String),
}

/// One line of a transcript.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// `→ ...`
    Client(Said),
    /// `← ...`
    Server(Said),
    /// `[SIGTERM]`
    Sigterm,
}

fn said(text: &str) -> Said {
    let Some(inner) = text.strip_prefix('[').and_then(|t| t.strip_suffix(']')) else {
        return Said::Text(text.to_owned());
    };
    let bytes = inner
        .strip_prefix("binary, ")
        .and_then(|r| r.strip_suffix(" bytes"));
    if let Some(n) = bytes.and_then(|n| n.parse().ok()) {
        return Said::Binary(n);
    }
    let close = inner.strip_prefix("close ").and_then(|rest| {
        let (code, reason) = rest.split_once(' ')?;
        let reason = reason.strip_prefix('"')?.strip_suffix('"')?;
        Some(Said::Close(code.parse().ok()?, reason.to_owned()))
    });
    close.unwrap_or_else(|| panic!("{README}: [{inner}] is neither a binary message nor a close"))
}

fn step(line: &str) -> Step {
    if line == "[SIGTERM]" {
        Step::Sigterm
    } else if let Some(text) = line.strip_prefix("→ ") {
        Step::Client(said(text))
    } else if let Some(text) = line.strip_prefix("← ") {
        Step::Server(said(text))
    } else {
        panic!("{README}: a transcript line that is not `→ `, `← ` or [SIGTERM]: {line:?}")
    }
}

/// Every transcript of the doc: the `text` blocks with a line that begins with an
/// arrow. Every line of such a block must be a step.
fn transcripts(doc: &str) -> Vec<Vec<Step>> {
    fenced(doc, "text")
        .into_iter()
        .filter(|block| {
            block
                .iter()
                .any(|l| l.starts_with("→ ") || l.starts_with("← "))
        })
        .map(|block| {
            block
                .iter()
                .filter(|l| !l.trim().is_empty())
                .map(|l| step(l))
                .collect()
        })
        .collect()
}

/// The next message from the server, as a transcript writes it; pings and pongs are
/// skipped (tungstenite answers the server's pings by itself).
async fn next_said(ws: &mut Ws) -> Said {
    loop {
        match next_message(ws).await {
            Message::Text(text) => return Said::Text(text.as_str().to_owned()),
            Message::Binary(data) => return Said::Binary(data.len()),
            Message::Close(Some(frame)) => {
                return Said::Close(u16::from(frame.code), frame.reason.as_str().to_owned());
            }
            Message::Close(None) => panic!("a close frame without a code"),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
        }
    }
}

fn message(said: &Said) -> Message {
    match said {
        Said::Text(text) => Message::text(text.clone()),
        Said::Binary(n) => Message::binary(vec![0_u8; *n]),
        Said::Close(code, reason) => Message::Close(Some(CloseFrame {
            code: CloseCode::from(*code),
            reason: reason.clone().into(),
        })),
    }
}

/// Replays `steps` as the only client of a server with the default settings. The
/// session must end with the server's close frame, after which nothing more comes.
async fn replay(steps: Vec<Step>) {
    assert!(
        matches!(steps.last(), Some(Step::Server(Said::Close(..)))),
        "{README}: a transcript ends with the server's close frame: {steps:?}"
    );
    let agent = FakeAgent::start().await;
    let mut server = Server::start(&agent, &[]).await;
    let mut ws = server.connect().await;
    let mut terminated = false;
    for (n, step) in steps.iter().enumerate() {
        match step {
            Step::Client(said) => ws
                .send(message(said))
                .await
                .unwrap_or_else(|e| panic!("step {n} ({step:?}): cannot send: {e}")),
            Step::Server(said) => {
                let got = next_said(&mut ws).await;
                assert_eq!(
                    &got, said,
                    "step {n} of the transcript {steps:?}: the server said {got:?}"
                );
            }
            Step::Sigterm => {
                server.service.terminate();
                terminated = true;
            }
        }
    }
    // Reading on sends the answer to the server's close; then the stream ends.
    let rest = tokio::time::timeout(STEP, async {
        let mut more = Vec::new();
        while let Some(Ok(message)) = ws.next().await {
            if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
                more.push(message);
            }
        }
        more
    })
    .await
    .expect("the connection ends after the close frames");
    assert!(rest.is_empty(), "after the transcript {steps:?}: {rest:?}");
    if terminated {
        let status = server.service.wait_exit(STEP).await;
        assert_eq!(status.code(), Some(0), "exit status {status}");
    }
}

#[tokio::test]
async fn websocket_doc_transcripts_are_what_the_server_says() {
    let transcripts = transcripts(&readme());
    assert!(
        transcripts.len() >= 3,
        "{README}: {} transcripts",
        transcripts.len()
    );
    join_all(transcripts.into_iter().map(replay)).await;
}

// --- the refused upgrades -------------------------------------------------------------

/// What an upgrade was answered with, as the doc's table writes it.
type Refusal = (u16, String, Option<String>);

/// Refusals the doc states that the test below does not provoke: a leaving task's
/// (the metrics test at the end provokes it), and a server's as it shuts down (only an
/// upgrade read in the instant shutdown begins gets it: the listener closes at once).
const ELSEWHERE: [(u16, &str, &str); 2] = [
    (503, "this task is leaving its service", "1"),
    (503, "server shutting down", "1"),
];

/// The doc's table of refused upgrades.
fn refusal_rows(doc: &str) -> BTreeSet<Refusal> {
    table(doc, "| Status | Body | Retry-After | When |")
        .into_iter()
        .map(|row| {
            let status = row[0].parse().expect("a status");
            let retry = (row[2] != "—").then(|| code_span(&row[2]));
            (status, code_span(&row[1]), retry)
        })
        .collect()
}

/// An answer to a raw request.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        let mut headers = self.headers.iter();
        let (_, value) = headers.find(|(n, _)| n.eq_ignore_ascii_case(name))?;
        Some(value)
    }

    fn refusal(&self) -> Refusal {
        let retry = self.header("retry-after").map(str::to_owned);
        (self.status, self.body.clone(), retry)
    }
}

/// A websocket upgrade request for `port`: `version` is the HTTP version; `headers`
/// take the place of the usual ones of their names, and those named in `without`
/// are left out.
fn upgrade(port: u16, version: &str, headers: &[(&str, &str)], without: &[&str]) -> String {
    let mut request = format!("GET / {version}\r\nHost: 127.0.0.1:{port}\r\n");
    let usual = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ];
    let kept = usual
        .into_iter()
        .filter(|(name, _)| !without.contains(name) && headers.iter().all(|(n, _)| n != name));
    for (name, value) in kept.chain(headers.iter().copied()) {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request + "\r\n"
}

/// Sends `request`, which must be refused as a row of the doc's `rows` says; returns
/// the answer.
async fn refused(port: u16, rows: &BTreeSet<Refusal>, request: String) -> Answer {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut read = Vec::new();
    let answer = tokio::time::timeout(STEP, async {
        loop {
            let mut chunk = [0_u8; 1024];
            let n = tcp.read(&mut chunk).await.unwrap();
            read.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&read).into_owned();
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                assert_ne!(n, 0, "closed before the end of the answer's head: {text:?}");
                continue;
            };
            let mut lines = head.lines();
            let status_line = lines.next().unwrap_or_default();
            let status = status_line
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok());
            let answer = Answer {
                status: status.unwrap_or_else(|| panic!("not a status line: {status_line:?}")),
                headers: lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                    .collect(),
                body: body.to_owned(),
            };
            let length = answer.header("content-length");
            let length = length.and_then(|l| l.parse::<usize>().ok());
            if n == 0 || answer.status == 101 || length.is_some_and(|l| body.len() >= l) {
                return answer;
            }
        }
    })
    .await
    .expect("an answer in time");
    let refusal = answer.refusal();
    let plain = answer.header("content-type");
    assert_eq!(plain, Some("text/plain; charset=utf-8"), "{answer:?}");
    assert!(
        rows.contains(&refusal),
        "{README} does not list {refusal:?}, the answer to\n{request}"
    );
    answer
}

/// An upgrade's HTTP version, the headers that take the place of the usual ones, and
/// the usual ones left out.
type Request = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [&'static str],
);

/// Upgrades refused before anything is counted.
const MALFORMED: [Request; 7] = [
    ("HTTP/1.0", &[], &[]),
    ("HTTP/1.1", &[("Upgrade", "h2c")], &[]),
    ("HTTP/1.1", &[("Connection", "keep-alive")], &[]),
    ("HTTP/1.1", &[("Sec-WebSocket-Version", "12")], &[]),
    ("HTTP/1.1", &[], &["Sec-WebSocket-Key"]),
    ("HTTP/1.1", &[("Origin", "https://app.example.com"); 2], &[]),
    ("HTTP/1.1", &[("Origin", "https://evil.example")], &[]),
];

#[tokio::test]
async fn websocket_doc_refusals_and_status_are_what_the_server_answers() {
    let doc = readme();
    let rows = refusal_rows(&doc);
    let agent = FakeAgent::start().await;
    let server = Server::start(
        &agent,
        &[
            ("ALLOWED_ORIGINS", "https://app.example.com".to_owned()),
            ("MAX_CONNECTIONS", "2".to_owned()),
            ("MAX_CONNECTIONS_PER_ADDRESS", "1".to_owned()),
            ("TRUST_X_FORWARDED_FOR", "true".to_owned()),
            ("MAX_FRAMES_PER_SECOND", "10".to_owned()),
        ],
    )
    .await;
    let port = server.port;
    let mut provoked = BTreeSet::new();
    for (version, headers, without) in MALFORMED {
        let answer = refused(port, &rows, upgrade(port, version, headers, without)).await;
        if answer.status == 426 {
            let version = answer.header("sec-websocket-version");
            assert_eq!(version, Some("13"), "{answer:?}");
        }
        provoked.insert(answer.refusal());
    }
    let from = |address: &str| upgrade(port, "HTTP/1.1", &[("X-Forwarded-For", address)], &[]);
    let xff = |address: &str| format!("X-Forwarded-For: {address}\r\n");

    // A client that floods is closed with 1008, and its address turned away for a while.
    let mut flooder = raw_upgrade(port, &xff("192.0.2.9")).await;
    // 25 frames at once: at least 13 of them within one second, over the budget of 10.
    let flood = client_frame(true, 1, b"x").repeat(25);
    flooder.write_all(&flood).await.unwrap();
    assert_eq!(server_close_code(&mut flooder).await, 1008);
    server.wait_for_connections(0).await;
    provoked.insert(refused(port, &rows, from("192.0.2.9")).await.refusal());

    // One client per address, two in all.
    let _first = raw_upgrade(port, &xff("192.0.2.1")).await;
    provoked.insert(refused(port, &rows, from("192.0.2.1")).await.refusal());
    let _second = raw_upgrade(port, &xff("192.0.2.2")).await;
    provoked.insert(refused(port, &rows, from("192.0.2.3")).await.refusal());

    let elsewhere = ELSEWHERE
        .iter()
        .map(|(status, body, retry)| (*status, (*body).to_owned(), Some((*retry).to_owned())));
    let expected: BTreeSet<Refusal> = provoked.into_iter().chain(elsewhere).collect();
    assert_eq!(
        rows, expected,
        "{README}'s refusals, against those provoked here and those checked elsewhere"
    );

    // The `/status` example has every field the server answers with, and no other.
    let examples = fenced(&doc, "json");
    assert_eq!(examples.len(), 1, "{README}: one JSON block, /status's");
    let example: Value = serde_json::from_str(&examples[0].join("\n"))
        .unwrap_or_else(|e| panic!("{README}: the /status example is not JSON: {e}"));
    let status = server.status().await;
    assert_eq!(
        shape(&example),
        shape(&status),
        "{README}'s /status example, against the server's {status}"
    );
}

/// `value` with every leaf made `null`: its fields, and their fields.
fn shape(value: &Value) -> Value {
    match value {
        Value::Object(fields) => fields
            .iter()
            .map(|(name, v)| (name.clone(), shape(v)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        _ => Value::Null,
    }
}

// --- the close codes ------------------------------------------------------------------

/// The close reason the test below does not provoke: it takes 30 s (backpressure.rs
/// closes such a client).
const CLOSE_ELSEWHERE: &str = "too slow to read: replies untaken for 30 s";

/// Whether `text` is what a reason of the doc says, word by word: `N` and `M` stand
/// for a number, `...` for any text.
fn fits(pattern: &str, text: &str) -> bool {
    let (word, rest) = pattern.split_once(' ').unwrap_or((pattern, ""));
    let after = |text: &str| match (rest, text.strip_prefix(' ')) {
        ("", _) => text.is_empty(),
        (rest, Some(text)) => fits(rest, text),
        (_, None) => false,
    };
    match word {
        "N" | "M" => {
            let digits = text.len() - text.trim_start_matches(|c: char| c.is_ascii_digit()).len();
            digits > 0 && after(&text[digits..])
        }
        "..." => (0..=text.len()).any(|i| text.is_char_boundary(i) && after(&text[i..])),
        _ => text.strip_prefix(word).is_some_and(after),
    }
}

/// A server with `env`, and its agent.
async fn server_with(env: &[(&str, &str)]) -> (FakeAgent, Server) {
    let agent = FakeAgent::start().await;
    let env: Vec<(&str, String)> = env.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    let server = Server::start(&agent, &env).await;
    (agent, server)
}

/// The code and reason of the close frame the server sends after `bytes`, on a new
/// websocket.
async fn closed_after(server: &Server, bytes: &[u8]) -> (u16, String) {
    let mut tcp = raw_upgrade(server.port, "").await;
    tcp.write_all(bytes).await.unwrap();
    loop {
        let (opcode, payload) = server_frame(&mut tcp).await;
        if opcode == 0x8 {
            assert!(payload.len() >= 2, "a close frame without a code");
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            return (code, String::from_utf8_lossy(&payload[2..]).into_owned());
        }
    }
}

/// Every rule that closes a client is broken, and each close frame is one the doc's
/// table describes; every row of it is seen here, in a transcript, or is
/// [`CLOSE_ELSEWHERE`].
#[tokio::test]
async fn websocket_doc_close_codes_are_what_the_server_sends() {
    let doc = readme();
    let rows: Vec<(u16, String)> = table(&doc, "| Code | Reason | Sent when |")
        .into_iter()
        .filter_map(|row| Some((row[0].parse().ok()?, code_span(&row[1]))))
        .collect();
    let (_a, plain) = server_with(&[]).await;
    let budgets = [
        ("MAX_FRAMES_PER_SECOND", "10"),
        ("MAX_BYTES_PER_SECOND", "1024"),
    ];
    let (_b, budgeted) = server_with(&budgets).await;
    let heartbeats = [
        ("WS_PING_INTERVAL_SECONDS", "1"),
        ("MAX_CONNECTION_LIFETIME_SECONDS", "3"),
    ];
    let (_c, beating) = server_with(&heartbeats).await;
    // A burst sent at once falls in at most two of the budgets' seconds, and is over
    // the budget in one of them.
    let frame = |opcode, payload: &[u8]| client_frame(true, opcode, payload);
    let unfinished = &frame(1, b"0123456789")[..2 + 4 + 3];
    let mut seen = vec![
        closed_after(&plain, b"\x81\x02hi").await,
        closed_after(&plain, &frame(1, b"\xff\xfe")).await,
        closed_after(&plain, &frame(8, &1005_u16.to_be_bytes())).await,
        closed_after(&plain, &frame(9, b"").repeat(25)).await,
        closed_after(&budgeted, &frame(1, b"x").repeat(25)).await,
        closed_after(&budgeted, &frame(2, &[0; 1000]).repeat(5)).await,
        closed_after(&beating, unfinished).await,
    ];
    // The lifetime's end: `please reconnect`, then its close.
    let mut ws = beating.connect().await;
    next_said(&mut ws).await;
    let told = next_said(&mut ws).await;
    assert_eq!(told, Said::Text("please reconnect".to_owned()));
    match next_said(&mut ws).await {
        Said::Close(code, reason) => seen.push((code, reason)),
        other => panic!("after `please reconnect`: {other:?}"),
    }
    // The transcripts' closes, but for the answer to a client's close (its own row).
    for steps in transcripts(&doc) {
        let mut echo = None;
        for step in steps {
            match step {
                Step::Client(Said::Close(code, reason)) => echo = Some((code, reason)),
                Step::Server(Said::Close(code, reason))
                    if echo.as_ref() != Some(&(code, reason.clone())) =>
                {
                    seen.push((code, reason));
                }
                _ => {}
            }
        }
    }
    for (code, reason) in &seen {
        let described = rows.iter().any(|(c, p)| c == code && fits(p, reason));
        assert!(described, "{README} has no close row for {code} {reason:?}");
    }
    for (code, pattern) in &rows {
        let found = seen.iter().any(|(c, r)| c == code && fits(pattern, r));
        assert!(
            found || *pattern == CLOSE_ELSEWHERE,
            "{README}'s close {code} {pattern:?} was never seen: {seen:?}"
        );
    }
}

// --- the metrics ----------------------------------------------------------------------

/// The names in the first column of the doc's metrics table.
fn documented_metrics(doc: &str) -> BTreeSet<String> {
    let section = doc
        .split_once("\n## Metrics\n")
        .unwrap_or_else(|| panic!("{README} has no `## Metrics` section"))
        .1;
    let section = section.split("\n## ").next().unwrap_or_default();
    let rows = table(section, "| Metric | Kind | Meaning |");
    let names: BTreeSet<String> = rows.iter().map(|row| code_span(&row[0])).collect();
    assert_eq!(names.len(), rows.len(), "{README}: a metric listed twice");
    names
}

/// The metric names an EMF line defines.
fn metric_names(line: &str) -> Vec<String> {
    let doc: Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not an EMF line ({e}): {line}"));
    doc["_aws"]["CloudWatchMetrics"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|directive| directive["Metrics"].as_array().cloned().unwrap_or_default())
        .map(|metric| {
            metric["Name"]
                .as_str()
                .unwrap_or_else(|| panic!("a metric without a Name: {line}"))
                .to_owned()
        })
        .collect()
}

async fn status(port: u16) -> Value {
    let Ok(answer) = reqwest::get(format!("http://127.0.0.1:{port}/status")).await else {
        return Value::Null;
    };
    answer.json().await.unwrap_or_default()
}

/// Two tasks of a simulated service, each with a client; the service scales in to one,
/// and the task that leaves refuses a new client, then lets protection go once its
/// client has left. Over that, the tasks write every metric the doc lists, histograms
/// and drain included, and none it does not.
#[tokio::test]
async fn websocket_doc_metrics_are_what_a_draining_server_writes() {
    let doc = readme();
    let documented = documented_metrics(&doc);
    let env = [
        ("RUST_LOG", "info"),
        ("METRICS", "emf"),
        ("METRICS_INTERVAL_SECONDS", "1"),
        ("DRAIN_CHECK_SECONDS", "3"),
        // The test's client leaves by itself, so that protection goes at a known time.
        ("DRAIN_NOTICE_SECONDS", "600"),
        ("SHUTDOWN_GRACE_SECONDS", "5"),
    ];
    let mut config = SimConfig::websocket(2).env(env).at_test_pace();
    config.ecs.stop_timeout = Duration::from_secs(30);
    let sim = Simulator::start(config).await;
    let ports: Vec<u16> = sim.model().wanted().filter_map(|t| t.port).collect();
    assert_eq!(ports.len(), 2, "{}", sim.describe());
    let mut clients = Vec::new();
    for port in &ports {
        let (ws, _) = connect_async(format!("ws://127.0.0.1:{port}/"))
            .await
            .unwrap_or_else(|e| panic!("cannot connect: {e}"));
        clients.push((*port, ws));
    }
    sim.wait_for("both tasks to be protected", STEP * 3, |m| {
        m.wanted().all(|t| t.protected(m.now))
    })
    .await;
    sim.set_desired(1);
    let leaving = wait_for("a task to leave", Duration::from_secs(60), || async {
        for port in &ports {
            if status(*port).await["drain"]["membership"] == "leaving" {
                return Some(*port);
            }
        }
        None
    })
    .await;

    let request = upgrade(leaving, "HTTP/1.1", &[], &[]);
    let answer = refused(leaving, &refusal_rows(&doc), request).await;
    assert_eq!(answer.body, ELSEWHERE[0].1, "{answer:?}");

    let index = clients.iter().position(|(p, _)| *p == leaving).unwrap();
    let (_, mut ws) = clients.swap_remove(index);
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    let lines = wait_for(
        "a metrics line with the drain's duration",
        Duration::from_secs(60),
        || async {
            let lines = sim.lines();
            lines
                .iter()
                .any(|(_, l)| l.contains("\"_aws\"") && l.contains("\"DrainDuration\""))
                .then_some(lines)
        },
    )
    .await;
    let written: BTreeSet<String> = lines
        .iter()
        .filter(|(_, l)| l.contains("\"_aws\""))
        .flat_map(|(_, l)| metric_names(l.trim()))
        .collect();
    assert_eq!(
        documented, written,
        "{README}'s metrics table, against the metrics the websocket wrote"
    );
    drop(clients);
}
