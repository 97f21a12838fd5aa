//! The `websocket` binary, driven with real tokio-tungstenite clients against a fake
//! ECS agent that records every protection PUT.

use std::time::Duration;

use e2e::agent::{Answer, FakeAgent, TASK_ARN};
use e2e::process::{Service, run_to_exit};
use e2e::wait_for;
use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

const START: Duration = Duration::from_secs(15);
const STEP: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A running `websocket` and the fake agent it talks to.
pub(crate) struct Server {
    pub(crate) service: Service,
    pub(crate) port: u16,
}

/// The environment that points the server at `agent`, on loopback.
pub(crate) fn env(agent: &FakeAgent, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("PORT", port.to_string()),
        ("BIND_ADDRESS", "127.0.0.1".to_owned()),
        ("ECS_AGENT_URI", agent.uri()),
        ("TASK_PROTECTION_BACKEND", "agent".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]
}

impl Server {
    /// Starts the server on `port` (0 for any) with `extra` settings.
    pub(crate) async fn start_on(
        agent: &FakeAgent,
        port: u16,
        extra: &[(&'static str, String)],
    ) -> Self {
        let mut vars = env(agent, port);
        vars.extend(extra.iter().cloned());
        let service = Service::spawn("websocket", &[], &vars);
        let line = service.wait_for_line("Listening on", START).await;
        let port =
            e2e::bench::listening_port(&line).unwrap_or_else(|| panic!("no port in {line:?}"));
        // A new process first releases whatever an earlier one in its task may have
        // left (at once: maintain is 0 %); tests count their own PUTs from there.
        if extra.iter().all(|(k, _)| *k != "ECS_AGENT_URI") {
            wait_for("the release at start", START, || async {
                (!agent.puts().is_empty()).then_some(())
            })
            .await;
            agent.forget_puts();
        }
        Self { service, port }
    }

    pub(crate) async fn start(agent: &FakeAgent, extra: &[(&'static str, String)]) -> Self {
        Self::start_on(agent, 0, extra).await
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    async fn connect(&self) -> Ws {
        let (ws, _) = connect_async(format!("ws://127.0.0.1:{}/", self.port))
            .await
            .unwrap_or_else(|e| panic!("cannot connect: {e}"));
        ws
    }

    async fn status(&self) -> Value {
        reqwest::get(self.url("/status"))
            .await
            .and_then(reqwest::Response::error_for_status)
            .unwrap_or_else(|e| panic!("GET /status: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET /status is not JSON: {e}"))
    }

    async fn wait_for_connections(&self, n: u64) {
        wait_for(
            &format!("/status to count {n} connections"),
            STEP,
            || async { (self.status().await["connections"].as_u64() == Some(n)).then_some(()) },
        )
        .await;
    }
}

/// The next text message, skipping control frames.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let message = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("a message within the timeout")
            .expect("the connection is open")
            .expect("a message, not an error");
        match message {
            Message::Text(text) => return text.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// Reads until the server's close frame and returns its code.
async fn close_code(ws: &mut Ws) -> CloseCode {
    loop {
        let message = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("a close frame within the timeout");
        match message {
            Some(Ok(Message::Close(Some(frame)))) => return frame.code,
            Some(Ok(Message::Close(None))) => panic!("a close frame without a code"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("the connection failed before a close frame: {e}"),
            None => panic!("the connection ended without a close frame"),
        }
    }
}

/// Waits until the agent has seen a PUT that enables protection.
async fn wait_protected(agent: &FakeAgent) {
    wait_for("an enable PUT", STEP, || async {
        agent
            .puts()
            .iter()
            .any(e2e::agent::Recorded::enabled)
            .then_some(())
    })
    .await;
}

/// Waits until the last PUT disabled protection, after at least one enable.
async fn wait_released(agent: &FakeAgent) {
    wait_for("a release PUT", STEP, || async {
        let puts = agent.puts();
        (puts.iter().any(e2e::agent::Recorded::enabled) && agent.released()).then_some(())
    })
    .await;
}

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
async fn websocket_oversized_message_gets_1009() {
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut ws = server.connect().await;
    next_text(&mut ws).await;
    // 1 KiB is the largest message accepted by default.
    ws.send(Message::text("x".repeat(1024))).await.unwrap();
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "pong");
    ws.send(Message::text("x".repeat(1024 + 1))).await.unwrap();
    assert_eq!(close_code(&mut ws).await, CloseCode::Size);
    server.wait_for_connections(0).await;
    // A client gone within the second after the release at start never needed an
    // enable; one that stayed longer is followed by a release.
    wait_for("ECS to hold no protection", STEP, || async {
        (agent.released() && !agent.ecs_protected_at(std::time::Instant::now())).then_some(())
    })
    .await;
}

/// The next frame the server sends on a raw connection: its opcode and payload
/// (a server's frames are never masked).
async fn server_frame(tcp: &mut (impl tokio::io::AsyncRead + Unpin)) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut head = [0_u8; 2];
        tcp.read_exact(&mut head).await?;
        let len = match head[1] & 0x7f {
            126 => {
                let mut len = [0_u8; 2];
                tcp.read_exact(&mut len).await?;
                u64::from(u16::from_be_bytes(len))
            }
            127 => {
                let mut len = [0_u8; 8];
                tcp.read_exact(&mut len).await?;
                u64::from_be_bytes(len)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0_u8; usize::try_from(len).unwrap()];
        tcp.read_exact(&mut payload).await?;
        Ok::<_, std::io::Error>((head[0] & 0x0f, payload))
    };
    tokio::time::timeout(STEP, read)
        .await
        .expect("a frame from the server in time")
        .expect("the connection is open")
}

/// Reads the server's frames up to its close frame, and returns the close code.
async fn server_close_code(tcp: &mut (impl tokio::io::AsyncRead + Unpin)) -> u16 {
    loop {
        let (opcode, payload) = server_frame(tcp).await;
        if opcode == 0x8 {
            assert!(payload.len() >= 2, "a close frame without a code");
            return u16::from_be_bytes([payload[0], payload[1]]);
        }
    }
}

#[tokio::test]
async fn websocket_message_over_the_limit_is_refused_at_the_fragment_header_that_crosses_it() {
    use tokio::io::AsyncWriteExt;
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut tcp = raw_upgrade(server.port, "").await;
    assert_eq!(server_frame(&mut tcp).await.0, 0x1, "the welcome");
    // Each fragment is under the 1 KiB limit; together they are over it. The second
    // fragment's header says so: the server must refuse there, not wait for its
    // payload (here it never comes whole: the last byte is held back).
    let mut message = client_frame(false, 0x1, &[b'x'; 1000]);
    message.extend_from_slice(&client_frame(true, 0x9, b"in between"));
    let mut crossing = client_frame(true, 0x0, &[b'x'; 1000]);
    crossing.pop();
    message.extend_from_slice(&crossing);
    tcp.write_all(&message).await.unwrap();
    loop {
        let (opcode, payload) = server_frame(&mut tcp).await;
        match opcode {
            0xA => assert_eq!(payload, b"in between", "the ping's pong"),
            // The server's own heartbeat.
            0x9 => {}
            0x8 => {
                assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1009);
                break;
            }
            other => panic!("unexpected frame {other:#x}"),
        }
    }
    server.wait_for_connections(0).await;
}

#[tokio::test]
async fn websocket_oversized_frame_is_refused_from_its_header_while_the_client_still_sends() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncWriteExt;
    /// Far more than the kernel buffers between the two ends can hold, so the client
    /// can only send it all if the server reads it.
    const ANNOUNCED: usize = 64 * 1024 * 1024;
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let tcp = raw_upgrade(server.port, "").await;
    let (mut from_server, mut to_server) = tcp.into_split();
    assert_eq!(server_frame(&mut from_server).await.0, 0x1, "the welcome");
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = tokio::spawn({
        let sent = Arc::clone(&sent);
        async move {
            let mut header = client_frame(true, 0x2, &[]);
            header[1] = 0x80 | 127;
            header.splice(2..2, (ANNOUNCED as u64).to_be_bytes());
            to_server.write_all(&header).await?;
            let chunk = vec![b'x'; 16 * 1024];
            while sent.load(Ordering::SeqCst) < ANNOUNCED {
                to_server.write_all(&chunk).await?;
                sent.fetch_add(chunk.len(), Ordering::SeqCst);
            }
            Ok::<_, std::io::Error>(())
        }
    });
    assert_eq!(server_close_code(&mut from_server).await, 1009);
    let sent_then = sent.load(Ordering::SeqCst);
    assert!(
        sent_then < ANNOUNCED,
        "the close came after the whole payload ({sent_then} bytes) was sent"
    );
    eprintln!("1009 arrived after {sent_then} of {ANNOUNCED} payload bytes");
    sender.abort();
    server.wait_for_connections(0).await;
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
async fn websocket_sigterm_closes_every_client_with_1001_and_exits_0() {
    let agent = FakeAgent::start().await;
    let mut server = Server::start(&agent, &[("SHUTDOWN_GRACE_SECONDS", "3".to_owned())]).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut ws = server.connect().await;
        next_text(&mut ws).await;
        clients.push(ws);
    }
    // One more never reads, so never answers the close: the grace period bounds it.
    let mut deaf = server.connect().await;
    next_text(&mut deaf).await;
    wait_protected(&agent).await;

    let asked = std::time::Instant::now();
    server.service.terminate();
    let goodbyes = join_all(clients.iter_mut().map(|ws| async move {
        let text = next_text(ws).await;
        let code = close_code(ws).await;
        // Answer the close, as browsers do.
        while let Some(Ok(_)) = ws.next().await {}
        (text, code)
    }))
    .await;
    for (text, code) in goodbyes {
        assert_eq!(text, "server shutting down");
        assert_eq!(code, CloseCode::Away);
    }
    let status = server.service.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        asked.elapsed()
    );
    assert!(agent.released(), "protection released at shutdown");
    assert!(server.service.count("Task protection released") >= 1);
    drop(deaf);
}

#[tokio::test]
async fn websocket_second_ctrl_c_tells_every_client_at_once() {
    // 5,000 clients at 100 a second: the goodbye would be spread over 50 s. A second
    // ctrl-c at a terminal means "now", as it does for the worker.
    const CLIENTS: u64 = 5_000;
    let agent = FakeAgent::start().await;
    let mut server = Server::start(
        &agent,
        &[
            ("GOODBYE_RATE", "100".to_owned()),
            ("SHUTDOWN_GRACE_SECONDS", "120".to_owned()),
        ],
    )
    .await;
    let mut readers = Vec::new();
    for _ in 0..CLIENTS {
        let mut ws = server.connect().await;
        readers.push(tokio::spawn(async move {
            // Read to the end, answering the close as a browser does.
            while let Some(Ok(_)) = ws.next().await {}
        }));
    }
    server.wait_for_connections(CLIENTS).await;

    server.service.signal(nix::sys::signal::Signal::SIGINT);
    // Two signals sent before the first is handled are one signal (the kernel keeps
    // one pending SIGINT), so press again once the first is seen, as a person does.
    server.service.wait_for_line("Shutting down", STEP).await;
    let asked = std::time::Instant::now();
    server.service.signal(nix::sys::signal::Signal::SIGINT);
    let status = server.service.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let took = asked.elapsed();
    assert!(
        took < Duration::from_secs(20),
        "exit took {took:?} after the second ctrl-c, as if the goodbye went on"
    );
    assert_eq!(server.service.count("SIGINT received again"), 1);
    for reader in readers {
        reader.await.expect("the client does not panic");
    }
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
    assert_eq!(busy["protection"]["task_arn"], TASK_ARN);
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

// --- a hostile or careless client -----------------------------------------------------

/// `VmRSS` of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    e2e::bench::procfs::rss_kb(pid)
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// A websocket handshake over a raw TCP connection; returns the stream once the
/// server has answered 101.
async fn raw_upgrade(port: u16, extra_headers: &str) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    // Read byte by byte up to the end of the response head, so no frame is consumed.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0_u8; 1];
        let n = tokio::time::timeout(STEP, tcp.read(&mut byte))
            .await
            .expect("a handshake answer in time")
            .unwrap();
        assert_ne!(n, 0, "closed during the handshake: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    tcp
}

/// A masked client frame (all-zero mask, so the payload goes as is).
fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n @ 0..=125 => frame.push(0x80 | u8::try_from(n).unwrap()),
        n @ 126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// Keeps reading `ws` (so tungstenite answers the server's pings) until it ends;
/// returns the close code the server sent, if any.
async fn read_to_end(mut ws: Ws) -> Option<u16> {
    let mut code = None;
    while let Some(Ok(message)) = ws.next().await {
        if let Message::Close(Some(frame)) = message {
            code = Some(u16::from(frame.code));
        }
    }
    code
}

/// Per client, at most this much memory may stay behind after a client has sent the
/// largest message it could, or left a message unfinished. The release build's worst
/// case is about 6 KB (BENCHMARKS.md); this allows for the debug build.
const WORST_RSS_PER_CLIENT: u64 = 16 * 1024;

#[tokio::test]
async fn websocket_large_and_unfinished_messages_leave_no_large_buffers() {
    const CLIENTS: usize = 200;
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let pid = server.service.pid().unwrap();
    // Warm up: the runtime's and the allocator's first growth is not the clients'.
    let warm: Vec<Ws> = join_all((0..50).map(|_| server.connect())).await;
    drop(warm);
    server.wait_for_connections(0).await;
    let before = rss(pid);

    // A quarter each: one 60 KiB message; the first 60 KiB fragment of one that
    // never ends; the same two at the largest size accepted (1 KiB by default), which
    // keep the client connected. Then each asks for a pong, which comes once the
    // server has read it all.
    let clients = join_all((0..CLIENTS).map(|i| {
        let server = &server;
        async move {
            use tokio_tungstenite::tungstenite::protocol::frame::Frame;
            use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
            let mut ws = server.connect().await;
            next_text(&mut ws).await;
            let size = if i % 4 < 2 { 60 * 1024 } else { 1000 };
            let attack = if i % 2 == 0 {
                Message::text("x".repeat(size))
            } else {
                Message::Frame(Frame::message(
                    vec![b'x'; size],
                    OpCode::Data(Data::Text),
                    false,
                ))
            };
            let _ = ws.send(attack).await;
            let _ = ws.send(Message::Ping(b"after".to_vec().into())).await;
            // A pong, or the server refusing the message: either way it has read it.
            loop {
                match tokio::time::timeout(STEP, ws.next())
                    .await
                    .expect("an answer")
                {
                    Some(Ok(Message::Pong(_) | Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                }
            }
            ws
        }
    }))
    .await;
    let connected = server.status().await["connections"].as_u64().unwrap();
    let after = rss(pid);
    let per_client = after.saturating_sub(before) / CLIENTS as u64;
    eprintln!(
        "RSS {before} → {after} bytes: {per_client} bytes per attacking client, {connected} still connected"
    );
    assert!(
        per_client <= WORST_RSS_PER_CLIENT,
        "{per_client} bytes per client stayed behind ({connected} of {CLIENTS} still connected)"
    );
    drop(clients);
}

/// RSS once two readings 300 ms apart agree (at most 5 s).
async fn settled_rss(pid: u32) -> u64 {
    let mut last = rss(pid);
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = rss(pid);
        if now == last {
            break;
        }
        last = now;
    }
    last
}

#[tokio::test]
async fn websocket_memory_taken_by_a_burst_of_oversized_messages_is_given_back() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    const CLIENTS: usize = 1_000;
    /// The target is 10 s (BENCHMARKS.md); twice that for a slow machine.
    const WITHIN: Duration = Duration::from_secs(20);
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let pid = server.service.pid().unwrap();
    // Warm up: the runtime's and the allocator's first growth is not the burst's.
    let warm: Vec<Ws> = join_all((0..100).map(|_| server.connect())).await;
    drop(warm);
    server.wait_for_connections(0).await;
    let idle = settled_rss(pid).await;

    // All at once, each sends a 60 KiB message in fragments under the limit, and is
    // refused with 1009.
    let codes = join_all((0..CLIENTS).map(|_| async {
        let mut ws = server.connect().await;
        next_text(&mut ws).await;
        let fragment = |opcode, fin| Message::Frame(Frame::message(vec![b'x'; 1000], opcode, fin));
        let _ = ws.feed(fragment(OpCode::Data(Data::Text), false)).await;
        for i in 1..61 {
            if ws
                .feed(fragment(OpCode::Data(Data::Continue), i == 60))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = ws.flush().await;
        read_to_end(ws).await
    }))
    .await;
    // A client still sending when the server hangs up may see its connection reset
    // before it reads the 1009.
    assert!(
        codes.iter().all(|code| matches!(code, Some(1009) | None)),
        "{codes:?}"
    );
    assert!(
        codes.contains(&Some(1009)),
        "no client was refused with 1009"
    );
    let burst = rss(pid);
    server.wait_for_connections(0).await;
    let left = std::time::Instant::now();
    wait_for(
        "the RSS back within 10 % of its level before the burst",
        WITHIN,
        || async { (rss(pid) * 10 <= idle * 11).then_some(()) },
    )
    .await;
    eprintln!(
        "RSS {idle} bytes at rest, {burst} after {CLIENTS} refused clients, back within 10 % \
         {:?} after they left",
        left.elapsed()
    );
}

#[tokio::test]
async fn websocket_unfinished_message_is_closed_with_1008() {
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[("WS_PING_INTERVAL_SECONDS", "1".to_owned())]).await;
    let mut ws = server.connect().await;
    next_text(&mut ws).await;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    ws.send(Message::Frame(Frame::message(
        b"half a mess".to_vec(),
        OpCode::Data(Data::Text),
        false,
    )))
    .await
    .unwrap();
    let started = std::time::Instant::now();
    // The client answers pings all along; only its unfinished message is wrong.
    let code = tokio::time::timeout(STEP, read_to_end(ws))
        .await
        .expect("the server ends the connection");
    let took = started.elapsed();
    assert_eq!(code, Some(1008), "after {took:?}");
    // Bound: two heartbeats of 1 s, and a little.
    assert!(took < Duration::from_secs(4), "took {took:?}");
    server.wait_for_connections(0).await;
}

#[tokio::test]
async fn websocket_ping_flood_from_a_client_that_never_reads_is_dropped() {
    use tokio::io::AsyncWriteExt;
    const FLOODERS: usize = 5;
    /// The flooders must be gone within this long, with the default settings.
    const GONE_WITHIN: Duration = Duration::from_secs(5);
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let port = server.port;
    let mut flooders = Vec::new();
    for _ in 0..FLOODERS {
        let mut tcp = raw_upgrade(port, "").await;
        flooders.push(tokio::spawn(async move {
            let started = std::time::Instant::now();
            let ping = client_frame(true, 0x9, &[b'p'; 125]).repeat(64);
            // Never reads; writes pings until the server hangs up (or 30 s pass).
            while started.elapsed() < Duration::from_secs(30) {
                if tcp.write_all(&ping).await.is_err() {
                    return Some(started.elapsed());
                }
            }
            None
        }));
    }
    for flooder in flooders {
        let gone = tokio::time::timeout(Duration::from_secs(40), flooder)
            .await
            .unwrap()
            .unwrap();
        eprintln!("a ping flooder was hung up on after {gone:?}");
        assert!(
            gone.is_some_and(|t| t < GONE_WITHIN),
            "still connected after {gone:?}"
        );
    }
    server.wait_for_connections(0).await;
    // An ordinary client is unaffected.
    let mut ws = server.connect().await;
    next_text(&mut ws).await;
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "pong");
}

#[tokio::test]
async fn websocket_slow_header_connection_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[("HTTP_HEADER_TIMEOUT_SECONDS", "1".to_owned())]).await;
    let mut tcp = TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaa")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(STEP, tcp.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "the unfinished header was still open after {STEP:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed after {:?}",
        started.elapsed()
    );
    // The server still serves.
    let health = reqwest::get(server.url("/healthz")).await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

#[tokio::test]
async fn websocket_flooding_client_hears_the_shutdown_within_100ms() {
    let agent = FakeAgent::start().await;
    let mut server = Server::start(&agent, &[("SHUTDOWN_GRACE_SECONDS", "3".to_owned())]).await;
    // A quiet client shows when the notice went out; the flooding one must not hear
    // it much later.
    let mut quiet = server.connect().await;
    next_text(&mut quiet).await;
    let mut ws = server.connect().await;
    next_text(&mut ws).await;
    let (mut sink, mut stream) = ws.split();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = std::sync::Arc::clone(&sent);
    let flood = tokio::spawn(async move {
        // Tiny frames, nonstop, until the server closes.
        loop {
            for _ in 0..64 {
                if sink.feed(Message::text("x")).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
            counter.fetch_add(64, std::sync::atomic::Ordering::Relaxed);
        }
    });
    wait_for("the flood to be under way", STEP, || async {
        (sent.load(std::sync::atomic::Ordering::Relaxed) > 20_000).then_some(())
    })
    .await;
    server.service.terminate();
    let quiet_heard = async {
        assert_eq!(next_text(&mut quiet).await, "server shutting down");
        std::time::Instant::now()
    };
    let flooder_heard = async {
        loop {
            match tokio::time::timeout(STEP, stream.next())
                .await
                .expect("the notice within the timeout")
            {
                Some(Ok(Message::Text(t))) if t.as_str() == "server shutting down" => {
                    break std::time::Instant::now();
                }
                Some(Ok(_)) => {}
                other => panic!("ended before the notice: {other:?}"),
            }
        }
    };
    let (quiet_at, flooder_at) = tokio::join!(quiet_heard, flooder_heard);
    let late = flooder_at.saturating_duration_since(quiet_at);
    eprintln!("the flooding client heard the shutdown {late:?} after a quiet one");
    assert!(late <= Duration::from_millis(100), "{late:?} late");
    flood.abort();
    server.service.wait_exit(STEP).await;
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

#[tokio::test]
async fn websocket_client_that_sends_but_never_reads_is_dropped_as_a_slow_reader() {
    use tokio::io::AsyncWriteExt;
    /// 10 s without write progress, and a little.
    const GONE_WITHIN: Duration = Duration::from_secs(15);
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut tcp = raw_upgrade(server.port, "").await;
    let started = std::time::Instant::now();
    // Each "ping" asks for a "pong" the client never reads: the server's writes back
    // up into small buffers and stop making progress.
    let pings = client_frame(true, 0x1, b"ping").repeat(256);
    let gone = loop {
        if tcp.write_all(&pings).await.is_err() {
            break started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(40), "never dropped");
    };
    eprintln!("a client that never reads was hung up on after {gone:?}");
    assert!(gone < GONE_WITHIN, "after {gone:?}");
    server.wait_for_connections(0).await;
}

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

/// Every metric the websocket writes, the gauge first.
const METRIC_NAMES: [&str; 12] = [
    "Connections",
    "ConnectionsOpened",
    "ConnectionsRefused",
    "ConnectionsClosedByClient",
    "ConnectionsClosedPingTimeout",
    "ConnectionsClosedSlowReader",
    "ConnectionsClosedOversize",
    "ConnectionsClosedAbuse",
    "ConnectionsClosedShutdown",
    "ConnectionsClosedLifetime",
    "MessagesIn",
    "MessagesOut",
];

/// Checks one EMF line against the specification and returns it parsed: a JSON
/// object with `_aws.Timestamp` in milliseconds and `_aws.CloudWatchMetrics[0]` whose
/// namespace is `namespace`, whose dimension names and metric names are all members
/// of the object with a number (or a histogram's distribution object, at most 100
/// `Values` with their `Counts`) as value, and whose metrics include every websocket
/// metric.
fn check_emf(line: &str, namespace: &str) -> serde_json::Map<String, Value> {
    let doc: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("an EMF line is not one whole JSON object ({e}): {line}"));
    let doc = doc
        .as_object()
        .expect("an EMF line is a JSON object")
        .clone();
    let aws = &doc["_aws"];
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let ts = u128::from(aws["Timestamp"].as_u64().expect("an integer Timestamp"));
    assert!(
        ts <= now_ms && now_ms - ts < 120_000,
        "Timestamp {ts} is not milliseconds of the last two minutes (now {now_ms})"
    );
    let directive = &aws["CloudWatchMetrics"][0];
    assert_eq!(directive["Namespace"], namespace, "{line}");
    let dimension_sets = directive["Dimensions"].as_array().expect("Dimensions");
    assert!(!dimension_sets.is_empty());
    for set in dimension_sets {
        for name in set.as_array().expect("a dimension set is an array") {
            let name = name.as_str().expect("a dimension name");
            assert!(
                doc[name].is_string(),
                "dimension {name} is not a member: {line}"
            );
        }
    }
    let defined: Vec<&str> = directive["Metrics"]
        .as_array()
        .expect("Metrics")
        .iter()
        .map(|m| m["Name"].as_str().expect("a metric Name"))
        .collect();
    for name in &defined {
        let value = &doc[*name];
        let numbers = |v: &Value| {
            v.as_array()
                .is_some_and(|a| !a.is_empty() && a.len() <= 100 && a.iter().all(Value::is_number))
        };
        let distribution_ok = numbers(&value["Values"])
            && numbers(&value["Counts"])
            && value["Values"].as_array().map(Vec::len) == value["Counts"].as_array().map(Vec::len)
            && ["Count", "Sum", "Min", "Max"]
                .iter()
                .all(|k| value[*k].is_number());
        assert!(
            value.is_number() || distribution_ok,
            "metric {name} is not a member: {line}"
        );
    }
    for name in METRIC_NAMES {
        assert!(defined.contains(&name), "{name} missing from {line}");
    }
    doc
}

/// 40 clients connect, ping, and leave; the EMF lines on stdout add up to that, each
/// is a whole JSON object on a line of its own, and the last one is written at exit.
/// With an interval of an hour, only the line written at exit holds the counts.
async fn websocket_emf_metrics_count_what_clients_did(log_format: &str, interval: &str) {
    const CLIENTS: u64 = 40;
    let agent = FakeAgent::start().await;
    let mut server = Server::start(
        &agent,
        &[
            ("METRICS", "emf".to_owned()),
            ("METRICS_INTERVAL_SECONDS", interval.to_owned()),
            ("METRICS_NAMESPACE", "E2E".to_owned()),
            ("METRICS_SERVICE", "ws-e2e".to_owned()),
            ("LOG_FORMAT", log_format.to_owned()),
        ],
    )
    .await;
    join_all((0..CLIENTS).map(|_| async {
        let mut ws = server.connect().await;
        next_text(&mut ws).await;
        ws.send(Message::text("ping")).await.unwrap();
        assert_eq!(next_text(&mut ws).await, "pong");
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    }))
    .await;
    server.wait_for_connections(0).await;
    let every_second = interval == "1";
    if every_second {
        // At least one line written on the interval, besides the last one at exit.
        server.service.wait_for_line("\"_aws\"", STEP).await;
    }
    server.service.terminate();
    let status = server.service.wait_exit(STEP).await;
    assert_eq!(status.code(), Some(0), "exit status {status}");

    // The process has exited, but its output may still be in the pipe: the line
    // written at exit is the last one.
    let service = &server.service;
    let lines = wait_for("the metrics line written at exit", STEP, || async {
        let lines = service.lines();
        lines
            .last()
            .is_some_and(|l| l.contains("\"_aws\""))
            .then_some(lines)
    })
    .await;
    let mut emf = Vec::new();
    for line in &lines {
        if line.contains("_aws") || line.contains("CloudWatchMetrics") {
            emf.push(check_emf(line, "E2E"));
        } else if log_format == "json" {
            let log: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("a JSON log line does not parse ({e}): {line}"));
            assert!(log.get("_aws").is_none());
        }
    }
    if every_second {
        assert!(emf.len() >= 2, "{} EMF lines", emf.len());
    } else {
        assert_eq!(emf.len(), 1, "only the line written at exit");
    }
    for doc in &emf {
        assert_eq!(doc["Service"], "ws-e2e");
    }
    let sum = |name: &str| -> u64 { emf.iter().map(|d| d[name].as_u64().unwrap()).sum() };
    let closed: u64 = METRIC_NAMES
        .iter()
        .filter(|n| n.starts_with("ConnectionsClosed"))
        .map(|n| sum(n))
        .sum();
    assert_eq!(sum("ConnectionsOpened"), CLIENTS);
    assert_eq!(closed, CLIENTS);
    assert_eq!(sum("ConnectionsClosedByClient"), CLIENTS);
    assert_eq!(sum("ConnectionsRefused"), 0);
    assert_eq!(sum("MessagesIn"), CLIENTS, "one ping each");
    assert_eq!(sum("MessagesOut"), 2 * CLIENTS, "a welcome and a pong each");
    let last = emf.last().unwrap();
    assert_eq!(last["Connections"].as_f64(), Some(0.0));
}

#[tokio::test]
async fn websocket_emf_metrics_with_text_logs() {
    websocket_emf_metrics_count_what_clients_did("text", "1").await;
}

#[tokio::test]
async fn websocket_emf_metrics_last_interval_is_written_at_exit() {
    websocket_emf_metrics_count_what_clients_did("text", "3600").await;
}

#[tokio::test]
async fn websocket_emf_metrics_with_json_logs() {
    websocket_emf_metrics_count_what_clients_did("json", "1").await;
}
