//! moto's `moto_server` as a real SQS-compatible server, and a TCP proxy in front of
//! it that can be cut and restored to play an SQS outage.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::Client;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::AbortHandle;

use crate::{free_port, wait_for, workspace_root};

/// How to start `moto_server`: `$MOTO_SERVER` as it is, or `tests/moto_server.py`
/// (moto's server with its deletes made atomic, as SQS's are) with the project venv's
/// Python, or `python3` from `PATH`.
#[must_use]
pub fn moto_server_command() -> tokio::process::Command {
    if let Some(p) = std::env::var_os("MOTO_SERVER") {
        return tokio::process::Command::new(p);
    }
    let venv = workspace_root().join(".venv/bin/python");
    let python = if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    };
    let mut command = tokio::process::Command::new(python);
    command.arg(workspace_root().join("tests/moto_server.py"));
    command
}

/// A running `moto_server`, killed on drop.
#[derive(Debug)]
pub struct Moto {
    child: tokio::process::Child,
    port: u16,
}

impl Moto {
    /// Starts `moto_server` on a free loopback port and waits until SQS answers.
    pub async fn start() -> Self {
        let port = free_port();
        let child = moto_server_command()
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start moto_server ({e}); run scripts/test, which installs it into .venv"
                )
            });
        let moto = Self { child, port };
        let client = moto.client();
        wait_for("moto_server to answer", Duration::from_secs(60), || {
            let client = client.clone();
            async move { client.list_queues().send().await.ok().map(|_| ()) }
        })
        .await;
        moto
    }

    /// The loopback port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The value for `AWS_ENDPOINT_URL`.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment a worker needs to use this server.
    #[must_use]
    pub fn env(&self) -> Vec<(&'static str, String)> {
        aws_env(&self.endpoint())
    }

    /// An SQS client for this server.
    #[must_use]
    pub fn client(&self) -> Client {
        client_for(&self.endpoint())
    }

    /// Creates a queue with this visibility timeout and returns its URL.
    pub async fn create_queue(&self, name: &str, visibility_secs: u32) -> String {
        self.client()
            .create_queue()
            .queue_name(name)
            .attributes(
                aws_sdk_sqs::types::QueueAttributeName::VisibilityTimeout,
                visibility_secs.to_string(),
            )
            .send()
            .await
            .unwrap_or_else(|e| panic!("create_queue {name}: {e:?}"))
            .queue_url
            .unwrap_or_else(|| panic!("create_queue {name}: no URL"))
    }

    /// Stops the server now.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// The AWS variables that point a process at `endpoint` with dummy credentials.
#[must_use]
pub fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_owned()),
        ("AWS_ACCESS_KEY_ID", "test".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
    ]
}

/// An SQS client for the server at `endpoint`.
#[must_use]
pub fn client_for(endpoint: &str) -> Client {
    let creds = aws_sdk_sqs::config::Credentials::new("test", "test", None, None, "e2e");
    let config = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .credentials_provider(creds)
        .endpoint_url(endpoint)
        .build();
    Client::from_conf(config)
}

/// Sends `body` to `queue`; returns its message id. Panics if SQS refuses.
pub async fn send(client: &Client, queue: &str, body: &str) -> String {
    client
        .send_message()
        .queue_url(queue)
        .message_body(body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("send {body:.20}: {e:?}"))
        .message_id
        .unwrap_or_default()
}

/// Sends `bodies` to `queue`, ten per call, in order; on a FIFO queue each in
/// `group`. Panics if SQS refuses one.
pub async fn send_all(client: &Client, queue: &str, group: Option<&str>, bodies: &[String]) {
    use aws_sdk_sqs::types::SendMessageBatchRequestEntry;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    for chunk in bodies.chunks(10) {
        let entries = chunk
            .iter()
            .enumerate()
            .map(|(i, body)| {
                let entry = SendMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .message_body(body);
                match group {
                    Some(g) => entry.message_group_id(g).message_deduplication_id(
                        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                            .to_string(),
                    ),
                    None => entry,
                }
                .build()
                .unwrap_or_else(|e| panic!("entry: {e}"))
            })
            .collect();
        let out = client
            .send_message_batch()
            .queue_url(queue)
            .set_entries(Some(entries))
            .send()
            .await
            .unwrap_or_else(|e| panic!("send_message_batch: {e:?}"));
        assert!(out.failed().is_empty(), "{:?}", out.failed());
    }
}

/// Creates queue `name` (FIFO when it ends in `.fifo`) with this visibility timeout,
/// and, when `max_receives` is given, a dead-letter queue `<name>-dlq` it redrives
/// to after that many receives. Returns the queue's URL and the dead-letter queue's.
pub async fn create_queue_with(
    client: &Client,
    name: &str,
    visibility_secs: u32,
    max_receives: Option<u32>,
) -> (String, Option<String>) {
    use aws_sdk_sqs::types::QueueAttributeName;
    let fifo = name.ends_with(".fifo");
    let create = |name: String| {
        let mut request = client.create_queue().queue_name(name).attributes(
            QueueAttributeName::VisibilityTimeout,
            visibility_secs.to_string(),
        );
        if fifo {
            request = request.attributes(QueueAttributeName::FifoQueue, "true");
        }
        request
    };
    let dlq = match max_receives {
        None => None,
        Some(max) => {
            let base = name.trim_end_matches(".fifo");
            let dlq_name = if fifo {
                format!("{base}-dlq.fifo")
            } else {
                format!("{base}-dlq")
            };
            let url = create(dlq_name)
                .send()
                .await
                .unwrap_or_else(|e| panic!("create the dead-letter queue: {e:?}"))
                .queue_url
                .unwrap_or_default();
            let arn = client
                .get_queue_attributes()
                .queue_url(&url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .ok()
                .and_then(|o| o.attributes?.get(&QueueAttributeName::QueueArn).cloned())
                .unwrap_or_else(|| panic!("no ARN for the dead-letter queue"));
            Some((url, arn, max))
        }
    };
    let mut request = create(name.to_owned());
    if let Some((_, arn, max)) = &dlq {
        request = request.attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"{max}"}}"#),
        );
    }
    let url = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("create_queue {name}: {e:?}"))
        .queue_url
        .unwrap_or_else(|| panic!("create_queue {name}: no URL"));
    (url, dlq.map(|(u, _, _)| u))
}

/// (visible, in flight) message counts of `queue`, or `None` when SQS cannot say.
pub async fn queue_counts(client: &Client, queue: &str) -> Option<(u64, u64)> {
    use aws_sdk_sqs::types::QueueAttributeName;
    let attrs = client
        .get_queue_attributes()
        .queue_url(queue)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .ok()?
        .attributes?;
    let n = |k: QueueAttributeName| attrs.get(&k).and_then(|v| v.parse().ok());
    Some((
        n(QueueAttributeName::ApproximateNumberOfMessages)?,
        n(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)?,
    ))
}

/// A TCP proxy on a loopback port, forwarding to `upstream`. [`cut`](Self::cut)
/// closes the port and every connection, so clients see "connection refused";
/// [`restore`](Self::restore) opens the same port again.
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    upstream: SocketAddr,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl TcpProxy {
    /// Starts forwarding a free port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let proxy = Self {
            port: free_port(),
            upstream,
            tasks: Arc::default(),
        };
        proxy.restore().await;
        proxy
    }

    /// The loopback port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Closes the port and every open connection.
    pub fn cut(&self) {
        let mut tasks = self
            .tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for t in tasks.drain(..) {
            t.abort();
        }
    }

    /// Listens on the same port again.
    pub async fn restore(&self) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let listener = wait_for(
            "the proxy port to bind",
            Duration::from_secs(10),
            || async {
                let socket = TcpSocket::new_v4().ok()?;
                socket.set_reuseaddr(true).ok()?;
                socket.bind(addr).ok()?;
                socket.listen(1024).ok()
            },
        )
        .await;
        let upstream = self.upstream;
        let tasks = Arc::clone(&self.tasks);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(conn.abort_handle());
            }
        });
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(accept.abort_handle());
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut();
    }
}
