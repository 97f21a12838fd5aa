//! The server in-process: built on port 0, stopped by the test's own future.

use std::time::Duration;

use futures_util::StreamExt;
use task_protection::{LocalBackend, ProtectionSettings, ShutdownReport, TaskProtection};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use websocket::{App, ServerSettings};

const STEP: Duration = Duration::from_secs(10);

#[tokio::test]
async fn serves_until_the_shutdown_future_then_says_goodbye_and_releases() {
    let protection = TaskProtection::start(LocalBackend::new(), ProtectionSettings::default());
    let app = App::build(ServerSettings::default(), protection.clone())
        .await
        .expect("binds port 0 on loopback");
    let port = app.port();
    assert_ne!(port, 0);
    let connections = app.connections();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = stopped.await;
    }));

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/"))
        .await
        .expect("connects");
    let mut next = async || loop {
        match tokio::time::timeout(STEP, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => return Some(t.as_str().to_owned()),
            Some(Ok(Message::Close(frame))) => {
                return frame.map(|f| format!("close {}", u16::from(f.code)));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return None,
        }
    };
    assert_eq!(
        next().await.as_deref(),
        Some("Welcome! There are 1 connections")
    );
    assert_eq!(connections.count(), 1);
    let mut state = protection.state();
    tokio::time::timeout(STEP, state.wait_for(|s| s.protected))
        .await
        .expect("protected in time")
        .expect("protection is running");

    stop.send(()).expect("the server is running");
    assert_eq!(next().await.as_deref(), Some("server shutting down"));
    assert_eq!(
        next().await,
        Some(format!("close {}", u16::from(CloseCode::Away)))
    );
    // Reading on sends the client's answer to the close, as a browser does.
    while next().await.is_some() {}
    let report = tokio::time::timeout(STEP, server)
        .await
        .expect("stops in time")
        .expect("does not panic")
        .expect("serves without error");
    assert_eq!(report, ShutdownReport::Released);
    assert_eq!(connections.count(), 0);
    assert!(!protection.current().protected);
}
