//! The `websocket` page in a real browser: Debian's headless Chromium, driven through
//! chromedriver with WebDriver.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use e2e::agent::FakeAgent;
use e2e::{free_port, wait_for};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types::PrivateKeyDer};

use crate::websocket::Server;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const STEP: Duration = Duration::from_secs(20);

/// chromedriver on a loopback port, with a fresh browser profile; both go away on drop.
pub(super) struct Driver {
    child: tokio::process::Child,
    port: u16,
    profile: PathBuf,
}

impl Driver {
    pub(super) async fn start() -> Self {
        for tool in [CHROMEDRIVER, CHROMIUM] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: scripts/setup installs Debian's chromium and chromium-driver"
            );
        }
        let port = free_port();
        let profile =
            std::env::temp_dir().join(format!("websocket-browser-{}-{port}", std::process::id()));
        let child = tokio::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start chromedriver: {e}"));
        wait_for("chromedriver to listen", STEP, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(drop)
        })
        .await;
        Self {
            child,
            port,
            profile,
        }
    }

    pub(super) async fn browser(&self) -> Client {
        self.browser_with(&[]).await
    }

    async fn browser_with(&self, extra: &[&str]) -> Client {
        // The machine has no internet: without these flags Chromium waits on the
        // network for updates, sync and first-run services.
        let profile = format!("--user-data-dir={}", self.profile.display());
        let mut args = vec![
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            &profile,
        ];
        args.extend_from_slice(extra);
        let capabilities = json!({
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args }
        });
        let serde_json::Value::Object(capabilities) = capabilities else {
            unreachable!("a JSON object")
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        tokio::time::timeout(
            STEP,
            ClientBuilder::new(connector)
                .capabilities(capabilities)
                .connect(&format!("http://127.0.0.1:{}", self.port)),
        )
        .await
        .expect("a browser session within the timeout")
        .unwrap_or_else(|e| panic!("cannot start a browser session: {e}"))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// HTTPS in front of the server, as the ALB's 443 listener: TLS with a self-signed
/// certificate for 127.0.0.1 on a loopback port, each connection forwarded as plain
/// bytes to the server's port. It speaks nothing but TLS, so a page or a websocket
/// that reaches the server through it came over https:// or wss://.
struct TlsFront {
    port: u16,
    task: JoinHandle<()>,
}

impl TlsFront {
    async fn start(upstream: u16) -> Self {
        let certified = rcgen::generate_simple_self_signed(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
        ])
        .expect("a self-signed certificate");
        let key = PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![certified.cert.der().clone()], key)
            .expect("a server configuration");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("a loopback port");
        let port = listener.local_addr().expect("an address").port();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let Ok(mut plain) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        Self { port, task }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) async fn text_of(browser: &Client, id: &str) -> String {
    match browser.find(Locator::Id(id)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until the page's log has `n` lines containing `needle`.
pub(super) async fn wait_for_log(browser: &Client, needle: &str, n: usize) {
    wait_for(
        &format!("{n} page log line(s) with {needle:?}"),
        STEP,
        || async {
            let log = text_of(browser, "log").await;
            (log.lines().filter(|l| l.contains(needle)).count() >= n).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn browser_page_connects_pings_and_reconnects_after_a_restart() {
    let agent = FakeAgent::start().await;
    let mut server = Server::start(&agent, &[]).await;
    let port = server.port;
    let driver = Driver::start().await;
    let browser = driver.browser().await;

    browser
        .goto(&format!("http://127.0.0.1:{port}/"))
        .await
        .expect("the page loads");
    wait_for_log(&browser, "Attempting to connect...", 1).await;
    wait_for_log(&browser, "Connected!", 1).await;
    wait_for_log(
        &browser,
        "Server says: \"Welcome! There are 1 connections\"",
        1,
    )
    .await;
    wait_for_log(&browser, "Client sent: \"ping\"", 1).await;
    wait_for_log(&browser, "Server says: \"pong\"", 1).await;
    assert_eq!(text_of(&browser, "state").await, "Connected");
    // The protection panel reads /status.
    wait_for("the page to show protection", STEP, || async {
        (text_of(&browser, "p-phase").await == "protected").then_some(())
    })
    .await;

    // Restart the server on the same port: the page is told to go away, then
    // reconnects by itself.
    server.service.terminate();
    let status = server.service.wait_exit(STEP).await;
    assert_eq!(status.code(), Some(0));
    wait_for_log(&browser, "Server says: \"server shutting down\"", 1).await;
    wait_for_log(&browser, "Disconnected (code 1001", 1).await;
    let restarted = Server::start_on(&agent, port, &[]).await;
    wait_for_log(&browser, "Connected!", 2).await;
    wait_for_log(
        &browser,
        "Server says: \"Welcome! There are 1 connections\"",
        2,
    )
    .await;
    wait_for_log(&browser, "Server says: \"pong\"", 2).await;
    assert_eq!(text_of(&browser, "state").await, "Connected");

    let _ = browser.close().await;
    drop(restarted);
}

#[tokio::test]
async fn browser_page_served_over_https_connects_with_wss() {
    // Behind the ALB's HTTPS listener the page is https://, and a browser refuses
    // a ws:// socket from it: the page must pick wss:// by itself.
    let agent = FakeAgent::start().await;
    let server = Server::start(&agent, &[]).await;
    let front = TlsFront::start(server.port).await;
    let driver = Driver::start().await;
    let browser = driver.browser_with(&["--ignore-certificate-errors"]).await;

    browser
        .goto(&format!("https://127.0.0.1:{}/", front.port))
        .await
        .expect("the page loads over https");
    wait_for_log(&browser, "Connected!", 1).await;
    wait_for_log(
        &browser,
        "Server says: \"Welcome! There are 1 connections\"",
        1,
    )
    .await;
    wait_for_log(&browser, "Server says: \"pong\"", 1).await;
    assert_eq!(text_of(&browser, "state").await, "Connected");
    let url: String = browser
        .execute("return window.location.protocol;", vec![])
        .await
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    assert_eq!(url, "https:");

    let _ = browser.close().await;
    drop(server);
}
