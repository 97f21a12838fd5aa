//! Closed to strangers: the deployments say whose pages may connect, one address
//! cannot take every slot, and `/status` tells anyone nothing that names the task.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use e2e::agent::{FakeAgent, TASK_ARN};
use e2e::wait_for;
use serde_norway::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::{STEP, Server, next_text, upgrade_request};

/// What Copilot's environment stack exports as `<app>-<env>-PublicLoadBalancerDNS`:
/// the ALB's `DNSName` (`internal/pkg/template/templates/environment/cf.yml` in
/// aws/copilot-cli), in the shape `COPILOT_LB_DNS` shows it, mixed case. Browsers
/// send the host in lower case in `Origin`.
const STAND_IN_LB_DNS: &str = "task-Publi-1RV8QEBNTEQCW-1762184596.us-east-1.elb.amazonaws.com";

/// The websocket manifest's variables as its task gets them: plain values as
/// written, imports (`from_cfn`) resolved to stand-ins.
fn manifest_variables() -> BTreeMap<String, String> {
    let path = e2e::workspace_root().join("copilot/websocket/manifest.yml");
    let manifest: Value = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{} is not YAML: {e}", path.display()));
    let variables = manifest
        .get("variables")
        .and_then(Value::as_mapping)
        .expect("the manifest has variables");
    variables
        .iter()
        .map(|(name, value)| {
            let name = name.as_str().expect("a variable name").to_owned();
            let value = match value {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => match other.get("from_cfn").and_then(Value::as_str) {
                    Some(
                        "${COPILOT_APPLICATION_NAME}-${COPILOT_ENVIRONMENT_NAME}-PublicLoadBalancerDNS",
                    ) => STAND_IN_LB_DNS.to_owned(),
                    _ => panic!("variables.{name}: no stand-in for {other:?}"),
                },
            };
            (name, value)
        })
        .collect()
}

/// Sends an upgrade request with `headers` from `source`, and returns the answer's
/// status with the connection, left open.
async fn upgrade_from(source: IpAddr, port: u16, headers: &str) -> (u16, TcpStream) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    let mut tcp = socket
        .connect((Ipv4Addr::LOCALHOST, port).into())
        .await
        .unwrap();
    tcp.write_all(upgrade_request(port, headers).as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0_u8; 1];
        let n = tokio::time::timeout(STEP, tcp.read(&mut byte))
            .await
            .expect("an answer in time")
            .unwrap();
        assert_ne!(n, 0, "closed without an answer: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, tcp)
}

async fn upgrade(port: u16, headers: &str) -> u16 {
    upgrade_from(IpAddr::V4(Ipv4Addr::LOCALHOST), port, headers)
        .await
        .0
}

/// A page of a foreign site is refused with 403; pages of `own` origins, and clients
/// without an `Origin` (not browsers), are let in.
pub(crate) async fn assert_strangers_refused(port: u16, own: &[String]) {
    assert_eq!(
        upgrade(port, "Origin: https://evil.example\r\n").await,
        403,
        "a foreign page"
    );
    for origin in own {
        assert_eq!(
            upgrade(port, &format!("Origin: {origin}\r\n")).await,
            101,
            "a page of {origin}"
        );
    }
    assert_eq!(upgrade(port, "").await, 101, "a client without Origin");
}

/// Starts the server with a deployment's variables, on loopback, and checks that a
/// foreign page is refused and pages of `own` origins are let in.
pub(crate) async fn assert_deployment_refuses_strangers(
    deployed: &BTreeMap<String, String>,
    own: &[String],
) {
    let agent = FakeAgent::start().await;
    let loopback = [
        ("PORT", "0".to_owned()),
        ("BIND_ADDRESS", "127.0.0.1".to_owned()),
    ];
    let mut vars: Vec<(&str, String)> = deployed
        .iter()
        .filter(|(name, _)| loopback.iter().all(|(k, _)| k != name))
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    vars.extend(loopback.iter().cloned());
    let server = Server::start(&agent, &vars).await;
    assert_strangers_refused(server.port, own).await;
    assert_eq!(
        server.service.count("ALLOWED_ORIGINS is not set"),
        0,
        "the deployment leaves origins open"
    );
}

#[tokio::test]
async fn websocket_foreign_origin_is_refused_with_the_shipped_manifest_settings() {
    let host = STAND_IN_LB_DNS.to_ascii_lowercase();
    assert_deployment_refuses_strangers(
        &manifest_variables(),
        &[format!("http://{host}"), format!("https://{host}")],
    )
    .await;
}

#[tokio::test]
async fn websocket_two_origin_headers_are_refused() {
    let agent = FakeAgent::start().await;
    let server = Server::start(
        &agent,
        &[("ALLOWED_ORIGINS", "https://app.example.com".to_owned())],
    )
    .await;
    let port = server.port;
    assert_eq!(
        upgrade(port, "Origin: https://app.example.com\r\n").await,
        101
    );
    for pair in [
        "Origin: https://app.example.com\r\nOrigin: https://evil.example\r\n",
        "Origin: https://evil.example\r\nOrigin: https://app.example.com\r\n",
        "Origin: https://app.example.com\r\nOrigin: https://app.example.com\r\n",
    ] {
        let status = upgrade(port, pair).await;
        assert!(
            status == 400 || status == 403,
            "two Origin headers got {status}: {pair:?}"
        );
    }
}

#[tokio::test]
async fn websocket_open_origins_are_said_once_at_start() {
    let agent = FakeAgent::start().await;
    let open = Server::start(&agent, &[]).await;
    let line = open
        .service
        .wait_for_line("ALLOWED_ORIGINS is not set", STEP)
        .await;
    assert!(line.contains("any site"), "{line}");
    let closed = Server::start(
        &agent,
        &[("ALLOWED_ORIGINS", "https://app.example.com".to_owned())],
    )
    .await;
    assert_eq!(closed.service.count("ALLOWED_ORIGINS is not set"), 0);
    assert_eq!(open.service.count("ALLOWED_ORIGINS is not set"), 1);
}

#[tokio::test]
async fn websocket_connections_per_address_are_capped() {
    let agent = FakeAgent::start().await;
    let server = Server::start(
        &agent,
        &[
            ("MAX_CONNECTIONS", "10".to_owned()),
            ("MAX_CONNECTIONS_PER_ADDRESS", "2".to_owned()),
        ],
    )
    .await;
    let port = server.port;
    let here = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let there = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut open = Vec::new();
    for _ in 0..2 {
        let (status, tcp) = upgrade_from(here, port, "").await;
        assert_eq!(status, 101);
        open.push(tcp);
    }
    assert_eq!(
        upgrade_from(here, port, "").await.0,
        429,
        "a third from one address"
    );
    // X-Forwarded-For is the client's to write: not trusted unless told.
    assert_eq!(
        upgrade_from(here, port, "X-Forwarded-For: 10.0.0.9\r\n")
            .await
            .0,
        429,
        "a third with a made-up X-Forwarded-For"
    );
    let (status, other) = upgrade_from(there, port, "").await;
    assert_eq!(status, 101, "another address");
    // One that leaves makes room for its address.
    drop(open.pop());
    server.wait_for_connections(2).await;
    assert_eq!(upgrade_from(here, port, "").await.0, 101);
    drop(other);
}

#[tokio::test]
async fn websocket_connections_per_address_follow_the_load_balancer_when_trusted() {
    let agent = FakeAgent::start().await;
    let server = Server::start(
        &agent,
        &[
            ("MAX_CONNECTIONS_PER_ADDRESS", "2".to_owned()),
            ("TRUST_X_FORWARDED_FOR", "true".to_owned()),
        ],
    )
    .await;
    let port = server.port;
    let behind = |client: &str| format!("X-Forwarded-For: {client}\r\n");
    let mut open = Vec::new();
    for _ in 0..2 {
        let (status, tcp) = upgrade_from(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
            &behind("198.51.100.7"),
        )
        .await;
        assert_eq!(status, 101);
        open.push(tcp);
    }
    assert_eq!(upgrade(port, &behind("198.51.100.7")).await, 429);
    // The load balancer appends the address it saw: what comes before is the
    // client's own text.
    assert_eq!(
        upgrade(port, &behind("203.0.113.1, 198.51.100.7")).await,
        429,
        "an address made up by the client in front of the real one"
    );
    let (status, other) = upgrade_from(
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        port,
        &behind("198.51.100.8"),
    )
    .await;
    assert_eq!(status, 101, "another client behind the same load balancer");
    drop((open, other));
}

#[tokio::test]
async fn websocket_status_names_the_task_only_when_asked() {
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let mut ws = server.connect().await;
    next_text(&mut ws).await;
    let status = wait_for("/status to show protection", STEP, || async {
        let s = server.status().await;
        (s["protection"]["protected"] == true).then_some(s)
    })
    .await;
    let text = status.to_string();
    // The ARN names the account, the Region and the cluster.
    for identifier in [TASK_ARN, "arn:aws", "123456789012"] {
        assert!(!text.contains(identifier), "{identifier} in {text}");
    }
    drop(ws);

    let asked = Server::start(&agent, &[("STATUS_SHOW_IDENTIFIERS", "true".to_owned())]).await;
    let mut ws = asked.connect().await;
    next_text(&mut ws).await;
    wait_for("/status to name the task", STEP, || async {
        (asked.status().await["protection"]["task_arn"] == TASK_ARN).then_some(())
    })
    .await;
}

#[tokio::test]
async fn websocket_index_html_is_the_page() {
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let root = reqwest::get(server.url("/")).await.unwrap();
    let index = reqwest::get(server.url("/index.html")).await.unwrap();
    assert_eq!(index.status().as_u16(), 200);
    let content_type = index.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/html"), "{content_type}");
    assert_eq!(index.text().await.unwrap(), root.text().await.unwrap());
}
