//! The `websocket` page in a real browser: Debian's headless Chromium, driven through
//! chromedriver with WebDriver.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use e2e::agent::FakeAgent;
use e2e::{free_port, wait_for};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::websocket::Server;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const STEP: Duration = Duration::from_secs(20);

/// chromedriver on a loopback port, with a fresh browser profile; both go away on drop.
struct Driver {
    child: tokio::process::Child,
    port: u16,
    profile: PathBuf,
}

impl Driver {
    async fn start() -> Self {
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

    async fn browser(&self) -> Client {
        // The machine has no internet: without these flags Chromium waits on the
        // network for updates, sync and first-run services.
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            &format!("--user-data-dir={}", self.profile.display()),
        ];
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

async fn text_of(browser: &Client, id: &str) -> String {
    match browser.find(Locator::Id(id)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Waits until the page's log has `n` lines containing `needle`.
async fn wait_for_log(browser: &Client, needle: &str, n: usize) {
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
