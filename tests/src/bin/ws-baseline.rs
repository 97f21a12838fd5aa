//! The benchmark's baseline: the least an axum websocket server can do and still
//! speak the sample's protocol. A welcome, `ping` → `pong`, a 1 KiB read buffer, and
//! nothing else: no limits, no server pings, no protection, no shutdown handling.
//!
//! `PORT` (default 0) picks the port; it prints `Listening on 127.0.0.1:<port>`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::routing::get;
use axum::serve::ListenerExt;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("Listening on {}", listener.local_addr()?);
    // Same socket option as the real server, so the comparison is the handler's.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let count = Arc::new(AtomicUsize::new(0));
    let app = Router::new()
        .route(
            "/",
            get(
                |upgrade: WebSocketUpgrade, State(count): State<Arc<AtomicUsize>>| async move {
                    upgrade
                        .read_buffer_size(1024)
                        .on_upgrade(move |socket| serve(socket, count))
                },
            ),
        )
        .with_state(count);
    axum::serve(listener, app).await
}

async fn serve(mut socket: WebSocket, count: Arc<AtomicUsize>) {
    let n = count.fetch_add(1, Ordering::SeqCst) + 1;
    let welcome = format!("Welcome! There are {n} connections");
    if socket.send(Message::Text(welcome.into())).await.is_ok() {
        while let Some(Ok(message)) = socket.recv().await {
            if let Message::Text(text) = message
                && text.as_str() == "ping"
                && socket.send(Message::Text("pong".into())).await.is_err()
            {
                break;
            }
        }
    }
    count.fetch_sub(1, Ordering::SeqCst);
}
