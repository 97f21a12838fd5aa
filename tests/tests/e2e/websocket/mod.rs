//! The `websocket` binary, driven with real tokio-tungstenite clients against a fake
//! ECS agent that records every protection PUT.
//!
//! This module holds the harness (a running server, raw frames, readers); each
//! submodule drives one concern:
//! - [`basics`]: the protocol, counting, `/healthz`, `/status`, the page, settings;
//! - [`backpressure`]: clients that read slowly are read slowly, not dropped;
//! - [`pipelined`]: frames sent with the upgrade request;
//! - [`limits`]: what one hostile or careless client may make the server hold;
//! - [`floods`]: the per-connection budget of frames and bytes;
//! - [`strangers`]: origins, addresses, and what `/status` tells anyone;
//! - [`shutdown`] and [`goodbye`]: the goodbye at SIGTERM and in a drain, and its pace;
//! - [`open_files`]: running short of file descriptors;
//! - [`metrics`]: the EMF lines;
//! - [`protocol_doc`]: `websocket/README.md` replayed against the server.

mod backpressure;
mod basics;
mod floods;
mod goodbye;
mod limits;
mod metrics;
mod open_files;
mod pipelined;
mod protocol_doc;
mod shutdown;
pub(crate) mod strangers;

use std::time::Duration;

use e2e::agent::FakeAgent;
use e2e::process::Service;
use e2e::wait_for;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
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
    pub(crate) async fn start_on(agent: &FakeAgent, port: u16, extra: &[(&str, String)]) -> Self {
        let mut vars: Vec<(&str, String)> = env(agent, port);
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

    pub(crate) async fn start(agent: &FakeAgent, extra: &[(&str, String)]) -> Self {
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

/// The next message of any kind, within [`STEP`].
async fn next_message(ws: &mut Ws) -> Message {
    tokio::time::timeout(STEP, ws.next())
        .await
        .expect("a message within the timeout")
        .expect("the connection is open")
        .expect("a message, not an error")
}

/// The next text message, skipping control frames.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        match next_message(ws).await {
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
    raw_upgrade_with(port, extra_headers, &[]).await
}

/// A websocket upgrade request for `port`, with `extra_headers` (each ending in CRLF).
fn upgrade_request(port: u16, extra_headers: &str) -> String {
    format!(
        "GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    )
}

/// As [`raw_upgrade`], with `pipelined` sent right behind the request in the same
/// write, as a client that does not wait for the 101 does.
async fn raw_upgrade_with(port: u16, extra_headers: &str, pipelined: &[u8]) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut request = upgrade_request(port, extra_headers).into_bytes();
    request.extend_from_slice(pipelined);
    tcp.write_all(&request).await.unwrap();
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
