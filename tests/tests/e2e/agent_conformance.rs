//! The wiremock agent against the conformance table in task-protection's docs
//! (`task_protection::testing::agent`), row by row, over HTTP: each row's request,
//! each row's status, content type, body and timing, and what ECS holds after it.
//! The table cites the agent's source for every row; this is what keeps the test
//! agent, and so every test that uses it, answering as the real one does.

use std::time::{Duration, Instant, SystemTime};

use e2e::agent::{ENDPOINT_ID, FakeAgent, STATE_PATH, TASK_ARN};
use task_protection::testing::agent::{ConformanceRow, EcsAfter, conformance};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An answer "at once" comes well within this, on a machine twice as slow.
const AT_ONCE: Duration = Duration::from_secs(1);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
}

/// Method and path (under the agent's root) of a row's request, and its body.
fn request(row: &ConformanceRow) -> (reqwest::Method, String, Option<String>) {
    let state = format!("/api/{ENDPOINT_ID}{STATE_PATH}");
    if let Some(body) = row.put_body() {
        return (reqwest::Method::PUT, state, Some(body.to_owned()));
    }
    let (method, rest) = row.request.split_once(' ').unwrap_or((&row.request, ""));
    let method: reqwest::Method = method.parse().unwrap();
    let path = if rest.is_empty() {
        state
    } else {
        rest.replace("{id}", ENDPOINT_ID)
    };
    let body = (method == reqwest::Method::PUT)
        .then(|| r#"{"ProtectionEnabled":true,"ExpiresInMinutes":5}"#.to_owned());
    (method, path, body)
}

/// Sends one row's request to a fresh agent and checks the answer and ECS's side.
async fn check_row(row: &ConformanceRow) {
    let agent = FakeAgent::start().await;
    agent.script([row.reply]);
    let (method, path, body) = request(row);
    let base = agent.uri().replace(&format!("/api/{ENDPOINT_ID}"), "");
    let mut send = client().request(method, format!("{base}{path}"));
    if let Some(body) = body {
        send = send.header("content-type", "application/json").body(body);
    }
    let sent = Instant::now();
    let now = SystemTime::now();
    let response = send.send().await.unwrap();
    let took = sent.elapsed();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    assert_eq!(Some(status), row.status, "{}: {text}", row.id);
    assert_eq!(content_type, row.content_type, "{}", row.id);
    row.check_body(&text, TASK_ARN, now).unwrap();
    if row.after.is_zero() {
        assert!(took < AT_ONCE, "{}: answered after {took:?}", row.id);
    } else {
        assert!(
            took >= row.after && took < task_protection::testing::agent::WRITE_TIMEOUT,
            "{}: answered after {took:?}, not {:?}",
            row.id,
            row.after
        );
    }
    let changes = agent.ecs_changes();
    match row.ecs_after {
        EcsAfter::Unchanged => assert!(changes.is_empty(), "{}: {changes:?}", row.id),
        EcsAfter::Off => assert!(
            changes.last().is_some_and(|(_, until)| until.is_none()),
            "{}: {changes:?}",
            row.id
        ),
        EcsAfter::On { minutes } => {
            let until = changes
                .last()
                .and_then(|(_, until)| *until)
                .unwrap_or_else(|| panic!("{}: {changes:?}", row.id));
            let want = sent + Duration::from_secs(minutes * 60);
            let off = until.max(want) - until.min(want);
            assert!(
                off < AT_ONCE,
                "{}: protected {off:?} off {minutes} min",
                row.id
            );
        }
    }
}

/// Past the limiter's burst: some of 70 PUTs sent at once get its 429, exactly as
/// it writes it, and no more pass than the bucket and its refill allow.
async fn check_burst(row: &ConformanceRow) {
    let agent = FakeAgent::start().await;
    let url = format!("{}{STATE_PATH}", agent.uri());
    let client = client();
    let started = Instant::now();
    let answers = futures_util::future::join_all((0..70).map(|_| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let response = client
                .put(&url)
                .header("content-type", "application/json")
                .body(r#"{"ProtectionEnabled":true,"ExpiresInMinutes":5}"#)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned());
            (status, content_type, response.text().await.unwrap())
        }
    }))
    .await;
    let took = started.elapsed().as_secs_f64();
    let passed = answers.iter().filter(|(s, _, _)| *s == 200).count();
    let limited: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 429).collect();
    assert_eq!(passed + limited.len(), 70, "{answers:?}");
    assert!(passed >= 60, "{passed} passed");
    #[allow(clippy::cast_precision_loss)]
    let allowed = 60.0 + took * 40.0 + 1.0;
    #[allow(clippy::cast_precision_loss)]
    let passed_f = passed as f64;
    assert!(passed_f <= allowed, "{passed} passed in {took}s");
    assert!(!limited.is_empty(), "none limited in {took}s");
    for (_, content_type, body) in limited {
        assert_eq!(
            content_type.as_deref(),
            row.content_type.as_deref(),
            "{}",
            row.id
        );
        row.check_body(body, TASK_ARN, SystemTime::now()).unwrap();
    }
}

/// An idle keep-alive connection is closed by the agent at its idle timeout.
async fn check_idle_close(row: &ConformanceRow) {
    let agent = FakeAgent::start().await;
    let mut stream = tokio::net::TcpStream::connect(agent.address())
        .await
        .unwrap();
    let request =
        format!("GET /api/{ENDPOINT_ID}{STATE_PATH} HTTP/1.1\r\nHost: 169.254.170.2\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0_u8; 4096];
    // Until the whole answer is in: its headers and Content-Length bytes.
    let answered = loop {
        let n = stream.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before the answer");
        answer.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&answer).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_owned)
                })
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if body.len() >= length {
                break Instant::now();
            }
        }
    };
    let closed = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
        .await
        .expect("the agent keeps an idle connection open");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let idle = answered.elapsed();
    assert!(
        idle >= row.after - Duration::from_millis(50) && idle < row.after + Duration::from_secs(2),
        "{}: closed after {idle:?} idle",
        row.id
    );
}

#[tokio::test]
async fn the_wiremock_agent_answers_every_row_of_the_conformance_table() {
    let rows = conformance().unwrap();
    assert!(rows.len() >= 29, "{}", rows.len());
    for row in &rows {
        match row.request.as_str() {
            "70 PUTs at once" => check_burst(row).await,
            "idle 5 s" => check_idle_close(row).await,
            _ => check_row(row).await,
        }
    }
}
