//! What the binaries write: each runs with a deployment's variables, and its first
//! CloudWatch EMF line is read.

use super::*;

// --- what the binaries write ----------------------------------------------------------

/// A metric as CloudWatch knows it: namespace, name, and each dimension's value.
pub(super) type Identity = (String, String, BTreeMap<String, String>);

/// What one EMF line of a binary says.
#[derive(Debug, Clone)]
pub(super) struct Written {
    pub(super) namespace: String,
    /// The dimension set, in the order the line declares it.
    pub(super) keys: Vec<String>,
    pub(super) values: BTreeMap<String, String>,
    pub(super) metrics: BTreeSet<String>,
}

impl Written {
    pub(super) fn parse(line: &str) -> Self {
        let doc: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let directive = &doc["_aws"]["CloudWatchMetrics"][0];
        let sets = directive["Dimensions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(sets.len(), 1, "one dimension set per line: {line}");
        let keys: Vec<String> = sets[0]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect();
        let values = keys
            .iter()
            .map(|k| (k.clone(), doc[k].as_str().unwrap_or_default().to_owned()))
            .collect();
        let metrics = directive["Metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["Name"].as_str().map(str::to_owned))
            .collect();
        Self {
            namespace: directive["Namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            keys,
            values,
            metrics,
        }
    }

    pub(super) fn identities(&self) -> BTreeSet<Identity> {
        self.metrics
            .iter()
            .map(|m| (self.namespace.clone(), m.clone(), self.values.clone()))
            .collect()
    }
}

/// Runs `binary` with metrics every second and `env`, gives it work (a client, or
/// a job) so that its histograms have samples too, and reads its EMF lines until one
/// carries the protection's acquire latency: every metric it wrote, with the
/// dimensions of its last line.
pub(super) async fn written(binary: &str, env: &[(&str, String)], moto: &Moto) -> Written {
    let port = free_port();
    let mut all: Vec<(&str, String)> = vec![
        ("TASK_PROTECTION_BACKEND", "local".to_owned()),
        ("METRICS", "emf".to_owned()),
        ("METRICS_INTERVAL_SECONDS", "1".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ];
    let mut queue = None;
    if binary == "websocket" {
        all.push(("PORT", port.to_string()));
        all.push(("BIND_ADDRESS", "127.0.0.1".to_owned()));
    } else {
        all.extend(aws_env(&moto.endpoint()));
        let url = moto.create_queue(&format!("jobs-{port}"), 30).await;
        all.push(("COPILOT_QUEUE_URI", url.clone()));
        queue = Some(url);
    }
    all.extend(env.iter().cloned());
    let service = Service::spawn(binary, &[], &all);
    let _client = match &queue {
        None => {
            let socket = wait_for("the server to take a client", STEP, || async {
                tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/"))
                    .await
                    .ok()
            })
            .await;
            Some(socket)
        }
        Some(url) => {
            service
                .wait_for_line("Long polling for messages", STEP)
                .await;
            send(&moto.client(), url, "10").await;
            service.wait_for_line(" - Done", STEP).await;
            None
        }
    };
    service
        .wait_for_line("ProtectionAcquireLatency", STEP)
        .await;
    let lines: Vec<Written> = service
        .lines()
        .iter()
        .filter(|l| l.contains("\"_aws\""))
        .map(|l| Written::parse(l.trim()))
        .collect();
    drop(service);
    let mut last = lines.last().cloned().expect("an EMF line");
    for line in &lines {
        assert_eq!(
            (&line.namespace, &line.keys, &line.values),
            (&last.namespace, &last.keys, &last.values),
            "every line of {binary} names the same metric identity"
        );
        last.metrics.extend(line.metrics.iter().cloned());
    }
    last
}

/// The metrics variables a deployment gives a service (the rest need an agent or
/// a load balancer), with `resolve` applied to `!Ref` values.
pub(super) fn metrics_variables(
    vars: &BTreeMap<String, Value>,
    resolve: &BTreeMap<&str, String>,
) -> Vec<(&'static str, String)> {
    const NAMES: [&str; 3] = [
        "METRICS_NAMESPACE",
        "METRICS_SERVICE",
        "METRICS_ENVIRONMENT",
    ];
    NAMES
        .iter()
        .filter_map(|n| Some((*n, resolved(vars.get(*n)?, resolve)?)))
        .collect()
}
