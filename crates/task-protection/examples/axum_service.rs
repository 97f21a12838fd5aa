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
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use task_protection::layer::{ProtectionLayer, RequestProtection};
use task_protection::{BackendConfig, ProtectionSettings, TaskProtection};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // TASK_PROTECTION_BACKEND picks the backend; unset, the ECS agent when
    // ECS_AGENT_URI is set, a local simulation outside ECS.
    let config = BackendConfig::from_env()?;
    let protection = TaskProtection::connect(&config, ProtectionSettings::default()).await?;

    let app = axum::Router::new()
        .route("/jobs", post(job))
        .route("/ws", get(websocket))
        .route("/healthz", get(|| async { "ok" }))
        // Only requests that match a route hold protection (a scanner's 404s hold
        // nothing), and the load balancer's checks never do.
        .route_layer(ProtectionLayer::new(protection.clone()).skip_paths(["/healthz"]));

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
/// takes another guard and moves it into the connection; while the task is leaving
/// its service there is none, and the client is sent elsewhere.
async fn websocket(
    upgrade: WebSocketUpgrade,
    Extension(request): Extension<RequestProtection>,
) -> Response {
    let Some(guard) = request.try_hold() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this task is leaving; try again\n",
        )
            .into_response();
    };
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
