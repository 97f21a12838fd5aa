//! The protocol as clients use it: welcome, ping and pong, counting, protection,
//! `/healthz`, `/status`, the page, origins and settings.

use std::time::Duration;

use e2e::agent::{Answer, FakeAgent};
use e2e::process::run_to_exit;
use e2e::wait_for;
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, connect_async};

use super::{STEP, Server, close_code, next_text, wait_protected, wait_released};

#[tokio::test]
async fn websocket_welcomes_and_answers_ping_with_pong() {
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut ws = server.connect().await;
    assert_eq!(next_text(&mut ws).await, "Welcome! There are 1 connections");
    server
        .service
        .wait_for_line(
            "New client connection opened. There are 1 connections",
            STEP,
        )
        .await;
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "pong");
    ws.send(Message::text("hello there")).await.unwrap();
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "pong");
    wait_protected(&agent).await;
    server
        .service
        .wait_for_line("Task protection acquired", STEP)
        .await;

    ws.close(None).await.unwrap();
    server
        .service
        .wait_for_line("Client connection closed. There are 0 connections", STEP)
        .await;
    wait_released(&agent).await;
    server
        .service
        .wait_for_line("Task protection released", STEP)
        .await;
    assert_eq!(agent.puts().len(), 2, "one enable, one release");
}

#[tokio::test]
async fn websocket_counts_concurrent_connections() {
    const CLIENTS: usize = 40;
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut clients = join_all((0..CLIENTS).map(|_| async {
        let mut ws = server.connect().await;
        let welcome = next_text(&mut ws).await;
        (ws, welcome)
    }))
    .await;
    // Each client was counted exactly once: the welcomes name 1..=40, each once.
    let mut counts: Vec<usize> = clients
        .iter()
        .map(|(_, w)| {
            w.strip_prefix("Welcome! There are ")
                .and_then(|r| r.strip_suffix(" connections"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("not a welcome: {w:?}"))
        })
        .collect();
    counts.sort_unstable();
    assert_eq!(counts, (1..=CLIENTS).collect::<Vec<_>>());
    server.wait_for_connections(CLIENTS as u64).await;
    wait_protected(&agent).await;

    join_all(clients.iter_mut().map(|(ws, _)| ws.close(None))).await;
    server.wait_for_connections(0).await;
    wait_released(&agent).await;
    let puts = agent.puts();
    assert_eq!(
        puts.iter().filter(|p| p.enabled()).count(),
        1,
        "one enable for 40 clients: {puts:?}"
    );
}

#[tokio::test]
async fn websocket_connect_storm_costs_a_handful_of_puts_and_ends_released() {
    const CLIENTS: usize = 1000;
    const AT_ONCE: usize = 50;
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let port = server.port;
    // One client first, until ECS protects the task: the storm then meets a task that
    // is protected, whatever the spacing after the release at start.
    let mut first = server.connect().await;
    next_text(&mut first).await;
    wait_protected(&agent).await;
    let started = std::time::Instant::now();
    let welcomed = futures_util::stream::iter(0..CLIENTS)
        .map(|_| async move {
            let (mut ws, _) = connect_async(format!("ws://127.0.0.1:{port}/"))
                .await
                .unwrap_or_else(|e| panic!("cannot connect: {e}"));
            let welcome = next_text(&mut ws).await;
            ws.close(None).await.unwrap();
            // Read the close answer so the server sees a clean close.
            while let Some(Ok(_)) = ws.next().await {}
            welcome.starts_with("Welcome!")
        })
        .buffer_unordered(AT_ONCE)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    let took = started.elapsed();
    assert_eq!(welcomed, CLIENTS);
    first.close(None).await.unwrap();
    while let Some(Ok(_)) = first.next().await {}
    server.wait_for_connections(0).await;
    wait_released(&agent).await;
    let puts = agent.puts();
    eprintln!(
        "{CLIENTS} clients came and went in {took:?}: {} PUTs",
        puts.len()
    );
    assert!(
        puts.len() <= 6,
        "{CLIENTS} clients in {took:?} cost {} PUTs: {puts:?}",
        puts.len()
    );
    assert!(!puts.last().is_some_and(e2e::agent::Recorded::enabled));
    let status = server.status().await;
    assert_eq!(status["protection"]["protected"], false, "{status}");
}

#[tokio::test]
async fn websocket_abrupt_drops_and_silent_peers_return_the_count_to_zero() {
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[("WS_PING_INTERVAL_SECONDS", "1".to_owned())]).await;

    // Two clients vanish with a TCP reset, mid-conversation.
    for _ in 0..2 {
        let mut ws = server.connect().await;
        next_text(&mut ws).await;
        ws.send(Message::text("ping")).await.unwrap();
        assert_eq!(next_text(&mut ws).await, "pong");
        if let MaybeTlsStream::Plain(tcp) = ws.get_ref() {
            tcp.set_zero_linger().unwrap();
        }
        drop(ws);
    }
    // Two clients go silent: connected, but they never read, so never answer a ping.
    let mut silent = Vec::new();
    for _ in 0..2 {
        let mut ws = server.connect().await;
        next_text(&mut ws).await;
        silent.push(ws);
    }
    wait_protected(&agent).await;

    server.wait_for_connections(0).await;
    server
        .service
        .wait_for_count("Client connection closed. There are 0 connections", 1, STEP)
        .await;
    wait_released(&agent).await;
    let status = server.status().await;
    assert_eq!(status["protection"]["protected"], false, "{status}");
    // The silent clients find their connection gone once they look.
    for mut ws in silent {
        let rest =
            tokio::time::timeout(STEP, async { while let Some(Ok(_)) = ws.next().await {} }).await;
        assert!(rest.is_ok(), "a dropped client's stream ends");
    }
}

#[tokio::test]
async fn websocket_max_connections_gets_503() {
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[("MAX_CONNECTIONS", "3".to_owned())]).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut ws = server.connect().await;
        next_text(&mut ws).await;
        open.push(ws);
    }
    match connect_async(format!("ws://127.0.0.1:{}/", server.port)).await {
        Err(WsError::Http(response)) => assert_eq!(response.status().as_u16(), 503),
        Err(other) => panic!("expected HTTP 503, got {other}"),
        Ok(_) => panic!("a fourth client was admitted past MAX_CONNECTIONS=3"),
    }
    // The page and /healthz still answer at the limit.
    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    // A client that leaves makes room.
    let mut first = open.remove(0);
    first.close(None).await.unwrap();
    server.wait_for_connections(2).await;
    let mut again = server.connect().await;
    assert_eq!(
        next_text(&mut again).await,
        "Welcome! There are 3 connections"
    );
}

#[tokio::test]
async fn websocket_rejection_is_broadcast_to_every_client() {
    let agent = FakeAgent::start().await;
    agent.always(Answer::Failure("DEPLOYMENT_BLOCKED"));
    // ECS is asked again every second while clients remain, so the test can see that
    // the clients are told once, not at every refusal.
    let server = Server::start(
        &agent,
        &[("PROTECTION_CHECK_INTERVAL_MS", "1000".to_owned())],
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = server.connect().await;
        assert!(next_text(&mut ws).await.starts_with("Welcome!"));
        clients.push(ws);
    }
    // Each hears it once: by broadcast if it was there at the refusal, after its
    // welcome if it came later.
    for ws in &mut clients {
        assert_eq!(next_text(ws).await, "server shutting down soon");
    }
    server
        .service
        .wait_for_count("Task protection rejected", 3, STEP)
        .await;
    for ws in &mut clients {
        let more = tokio::time::timeout(Duration::from_millis(200), next_text(ws)).await;
        assert!(more.is_err(), "told again: {more:?}");
    }
    let status = server.status().await;
    let rejection = status["protection"]["last_rejection"]
        .as_str()
        .unwrap_or_default();
    assert!(rejection.contains("DEPLOYMENT_BLOCKED"), "{status}");
    assert_eq!(status["protection"]["protected"], false);
    assert_eq!(status["connections"], 3, "a refusal does not drop clients");
}

#[tokio::test]
async fn websocket_healthz_status_page_and_healthcheck() {
    let agent = FakeAgent::start().await;
    let mut server = Server::start(&agent, &[]).await;

    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert_eq!(health.text().await.unwrap(), "Healthy");

    let page = reqwest::get(server.url("/")).await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let content_type = page.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    let html = page.text().await.unwrap();
    assert!(html.contains("Attempting to connect..."));
    assert!(html.contains("wss:"));

    let idle = server.status().await;
    assert_eq!(idle["connections"], 0);
    assert_eq!(idle["max_connections"], 10_000);
    assert_eq!(idle["protection"]["phase"], "idle");
    assert_eq!(idle["protection"]["protected"], false);
    assert_eq!(idle["protection"]["simulated"], false);
    // Outside ECS (no task metadata endpoint) the drain is off, and one line says so.
    assert_eq!(idle["drain"]["on"], false, "{idle}");
    assert_eq!(idle["drain"]["membership"], "wanted", "{idle}");
    assert_eq!(
        server
            .service
            .count("Drain is off: ECS_CONTAINER_METADATA_URI_V4 is not set"),
        1
    );

    let mut ws = server.connect().await;
    next_text(&mut ws).await;
    let busy = wait_for("/status to show protection", STEP, || async {
        let s = server.status().await;
        (s["protection"]["protected"] == true).then_some(s)
    })
    .await;
    assert_eq!(busy["connections"], 1);
    assert_eq!(busy["protection"]["phase"], "protected");
    // The task's ARN only with STATUS_SHOW_IDENTIFIERS (strangers.rs).
    assert_eq!(busy["protection"]["task_arn"], Value::Null, "{busy}");
    let expires = busy["protection"]["expires_at"]
        .as_str()
        .unwrap_or_default();
    assert!(expires.ends_with('Z') && expires.contains('T'), "{busy}");
    // 30 minutes by default.
    assert_eq!(agent.puts()[0].body["ExpiresInMinutes"], 30);

    let port = [("PORT", server.port.to_string())];
    let (ok, _, _) = run_to_exit("websocket", &["healthcheck"], &port).await;
    assert_eq!(ok.code(), Some(0));
    ws.close(None).await.unwrap();
    server.service.terminate();
    server.service.wait_exit(STEP).await;
    // Hold the freed port, bound but not listening, so that no server started by a
    // test running beside this one can take it: the check must find nothing there.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.set_reuseaddr(true).unwrap();
    reserved
        .bind(([127, 0, 0, 1], server.port).into())
        .unwrap_or_else(|e| panic!("port {} was taken again at once: {e}", server.port));
    let (down, _, stderr) = run_to_exit("websocket", &["healthcheck"], &port).await;
    assert_eq!(down.code(), Some(1), "{stderr}");
    assert!(stderr.contains("unhealthy"), "{stderr}");
    drop(reserved);
}

#[tokio::test]
async fn websocket_bad_setting_exits_2_with_one_line() {
    let (status, _, stderr) = run_to_exit(
        "websocket",
        &[],
        &[("WS_PING_INTERVAL_SECONDS", "0".to_owned())],
    )
    .await;
    assert_eq!(status.code(), Some(2));
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("WS_PING_INTERVAL_SECONDS=0"), "{stderr}");

    let (status, stdout, _) = run_to_exit("websocket", &["--help"], &[]).await;
    assert_eq!(status.code(), Some(0));
    for variable in [
        "PORT",
        "WS_PING_INTERVAL_SECONDS",
        "MAX_CONNECTIONS",
        "SHUTDOWN_GRACE_SECONDS",
        "MAX_MESSAGE_BYTES",
        "MAX_CONNECTION_LIFETIME_SECONDS",
        "ALLOWED_ORIGINS",
        "HTTP_HEADER_TIMEOUT_SECONDS",
        "LOG_FORMAT",
        "PROTECTION_DURATION_MINUTES",
        "TASK_PROTECTION_BACKEND",
    ] {
        assert!(
            stdout.contains(&format!("[env: {variable}=")),
            "{variable} missing"
        );
    }
}

#[tokio::test]
async fn websocket_refuses_h2c_prior_knowledge() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    // The HTTP/2 connection preface, then an empty SETTINGS frame.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(STEP, tcp.read_to_end(&mut answer)).await;
    // An HTTP/2 server answers with its own SETTINGS frame (type 4); an HTTP/1.1-only
    // server with an error status or nothing.
    let is_h2_settings = answer.len() >= 9 && answer[3] == 0x04;
    assert!(
        !is_h2_settings,
        "HTTP/2 was spoken: {:?}",
        &answer[..answer.len().min(32)]
    );
    if !answer.is_empty() {
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.1 5"),
            "{text}"
        );
    }
}

#[tokio::test]
async fn websocket_allowed_origins_refuse_other_pages() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let agent = FakeAgent::start().await;
    let server = Server::start(
        &agent,
        &[(
            "ALLOWED_ORIGINS",
            "https://app.example.com, https://other.example".to_owned(),
        )],
    )
    .await;
    let url = format!("ws://127.0.0.1:{}/", server.port);
    let with_origin = |origin: &str| {
        let mut request = url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Origin", origin.parse().unwrap());
        request
    };
    match connect_async(with_origin("https://evil.example")).await {
        Err(WsError::Http(response)) => assert_eq!(response.status().as_u16(), 403),
        Err(other) => panic!("expected HTTP 403, got {other}"),
        Ok(_) => panic!("a page from another origin was let in"),
    }
    let (mut ws, _) = connect_async(with_origin("https://app.example.com"))
        .await
        .expect("an allowed origin connects");
    assert!(next_text(&mut ws).await.starts_with("Welcome!"));
    // No Origin: not a browser, which could send any Origin it liked.
    let mut plain = server.connect().await;
    assert!(next_text(&mut plain).await.starts_with("Welcome!"));
}

#[tokio::test]
async fn websocket_connection_lifetime_tells_the_client_to_reconnect() {
    let agent = FakeAgent::start().await;
    let server = Server::start(
        &agent,
        &[
            ("WS_PING_INTERVAL_SECONDS", "1".to_owned()),
            ("MAX_CONNECTION_LIFETIME_SECONDS", "2".to_owned()),
        ],
    )
    .await;
    let mut ws = server.connect().await;
    next_text(&mut ws).await;
    let started = std::time::Instant::now();
    let told = tokio::time::timeout(Duration::from_secs(6), next_text(&mut ws))
        .await
        .expect("told to reconnect within 6 s");
    assert_eq!(told, "please reconnect");
    assert_eq!(close_code(&mut ws).await, CloseCode::Away);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "told after {took:?}"
    );
}

#[tokio::test]
async fn websocket_status_shows_short_errors_without_internal_addresses() {
    let agent = FakeAgent::start().await;
    // Nothing listens on this agent address: every PUT fails with an error that
    // names it.
    let gone = e2e::free_port();
    let server = Server::start(
        &agent,
        &[(
            "ECS_AGENT_URI",
            format!("http://127.0.0.1:{gone}/api/0123456789abcdef"),
        )],
    )
    .await;
    let mut ws = server.connect().await;
    next_text(&mut ws).await;
    let error = wait_for("/status to show the last error", STEP, || async {
        server.status().await["protection"]["last_error"]
            .as_str()
            .map(str::to_owned)
    })
    .await;
    eprintln!("/status shows: {error:?}");
    assert!(error.len() <= 120, "{error}");
    for secret in ["127.0.0.1", &gone.to_string(), "http", "0123456789abcdef"] {
        assert!(!error.contains(secret), "{secret} in {error:?}");
    }
}
