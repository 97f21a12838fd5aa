//! An axum service that is protected while it serves: every request holds
//! protection until its response has been sent, a websocket holds it for as long as
//! the connection lasts, and an idle service is released.
//!
//! ```sh
//! cargo run -p task-protection --example axum_service --features tower
//! curl -X POST localhost:3000/jobs    # protected for the two seconds it takes
//! ```

use std::time::Duration;

use axum::Extension;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::{get, post};
use task_protection::layer::{ProtectionLayer, RequestProtection};
use task_protection::{BackendConfig, BackendKind, ProtectionSettings, TaskProtection};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The ECS agent when ECS_AGENT_URI is set, a local simulation elsewhere.
    let config = BackendConfig::from_env(BackendKind::Auto);
    let protection = TaskProtection::connect(&config, ProtectionSettings::default()).await?;

    let app = axum::Router::new()
        .route("/jobs", post(job))
        .route("/ws", get(websocket))
        .layer(ProtectionLayer::new(protection.clone()))
        // After the layer, so the load balancer's checks never hold protection.
        .route("/healthz", get(|| async { "ok" }));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // ECS stops the task soon after SIGTERM anyway: release protection now.
    println!("{}", protection.shutdown().await);
    Ok(())
}

/// A request that takes a while: protected from the start to the last byte.
async fn job() -> &'static str {
    tokio::time::sleep(Duration::from_secs(2)).await;
    "done\n"
}

/// A websocket: the request's protection ends with the `101` answer, so the handler
/// takes another guard and moves it into the connection.
async fn websocket(
    upgrade: WebSocketUpgrade,
    Extension(request): Extension<RequestProtection>,
) -> Response {
    let guard = request.hold();
    upgrade.on_upgrade(move |socket| async move {
        echo(socket).await;
        drop(guard);
    })
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        if let Message::Text(text) = message
            && socket.send(Message::Text(text)).await.is_err()
        {
            break;
        }
    }
}
