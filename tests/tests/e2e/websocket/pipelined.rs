//! Frames a client sends right behind its upgrade request, without waiting for the
//! 101: hyper reads them with the request, and the server must follow the frames
//! from their first byte all the same.

use e2e::agent::FakeAgent;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::{STEP, Server, client_frame, raw_upgrade_with, server_frame};

/// Reads the server's frames until both the pong frame answering the client's ping
/// (payload `marker`) and the text `pong` have come; what came otherwise.
async fn answered(tcp: &mut TcpStream, marker: &[u8]) -> Result<(), String> {
    let (mut pong_frame, mut pong_text) = (false, false);
    let mut seen = Vec::new();
    let read = async {
        while !(pong_frame && pong_text) {
            let (opcode, payload) = server_frame(tcp).await;
            match opcode {
                0xA if payload == marker => pong_frame = true,
                0x1 if payload == b"pong" => pong_text = true,
                // The welcome, and the server's own heartbeat.
                0x1 | 0x9 => {}
                _ => {
                    seen.push((opcode, String::from_utf8_lossy(&payload).into_owned()));
                    return;
                }
            }
        }
    };
    let _ = tokio::time::timeout(STEP, read).await;
    if pong_frame && pong_text {
        Ok(())
    } else {
        Err(format!(
            "pong frame {pong_frame}, pong text {pong_text}, and instead {seen:?}"
        ))
    }
}

#[tokio::test]
async fn websocket_frames_pipelined_with_the_upgrade_are_read_at_every_split_point() {
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    // A 200-byte text frame (a 16-bit length), a ping with a payload, and `ping`.
    // DEL (0x7f) in the payload is what a reader that starts inside it takes for a
    // 64-bit length.
    let frames = [
        client_frame(true, 0x1, &[0x7f; 200]),
        client_frame(true, 0x9, b"marker"),
        client_frame(true, 0x1, b"ping"),
    ]
    .concat();
    let mut wrong = Vec::new();
    // The first `split` bytes go in the same write as the request, the rest after
    // the 101.
    for split in 0..=frames.len() {
        let mut tcp = raw_upgrade_with(server.port, "", &frames[..split]).await;
        tcp.write_all(&frames[split..]).await.unwrap();
        if let Err(what) = answered(&mut tcp, b"marker").await {
            wrong.push(format!("split at {split}: {what}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} split points misread:\n{}",
        wrong.len(),
        frames.len() + 1,
        wrong.join("\n")
    );
    server.wait_for_connections(0).await;
}

#[tokio::test]
async fn websocket_binary_messages_sent_right_behind_the_request_are_accepted() {
    const CLIENTS: usize = 30;
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut wrong = Vec::new();
    for client in 0..CLIENTS {
        // A random 500-byte binary message in front of the ping, cut at a random
        // point: the part behind the request is read with it, the rest after.
        let payload: Vec<u8> = (0..500).map(|_| rand::random::<u8>()).collect();
        let frames = [
            client_frame(true, 0x2, &payload),
            client_frame(true, 0x9, b"marker"),
            client_frame(true, 0x1, b"ping"),
        ]
        .concat();
        let split = rand::random_range(1..500);
        let mut tcp = raw_upgrade_with(server.port, "", &frames[..split]).await;
        tcp.write_all(&frames[split..]).await.unwrap();
        if let Err(what) = answered(&mut tcp, b"marker").await {
            wrong.push(format!("client {client}, split at {split}: {what}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {CLIENTS} misread:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
