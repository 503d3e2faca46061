//! Helpers shared by the integration tests: an in-process cluster on port 0,
//! extra simulated providers, and a raw SSE reader.

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of these helpers"
)]

pub mod proxy;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard::dev::{DevCluster, DevOptions};
use switchyard_loadtest::sim::{SimProvider, SimProviderConfig};
use switchyard_shared::money::MicroUsd;

pub const MODEL: &str = "mlx-community/Trinity-Mini-8bit";

/// Options for a cluster on a free loopback port with no default providers.
pub fn options(providers: usize) -> DevOptions {
    DevOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        providers,
        ..DevOptions::default()
    }
}

pub async fn start(options: DevOptions) -> DevCluster {
    DevCluster::start(options)
        .await
        .expect("dev cluster starts")
}

/// Starts a simulated provider serving `models`, linked to the cluster's provider
/// account, and waits until its session is on a node.
pub async fn add_provider(
    cluster: &DevCluster,
    models: &[&str],
    tweak: impl FnOnce(&mut SimProviderConfig),
) -> SimProvider {
    let before: usize = cluster.nodes.iter().map(|node| node.provider_count()).sum();
    let mut config = SimProviderConfig::new(
        cluster.provider_url(),
        models.iter().map(|model| model.to_string()).collect(),
    );
    config.reconnect = false;
    config.auth_token = Some(cluster.provider_token.clone());
    tweak(&mut config);
    let provider = SimProvider::spawn(config);
    cluster
        .wait_for_providers(before + 1, Duration::from_secs(10))
        .await
        .expect("provider registers");
    provider
}

pub fn chat_body(stream: bool) -> Value {
    json!({
        "model": MODEL,
        "stream": stream,
        "max_tokens": 64,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something short please"}
        ]
    })
}

pub async fn post_chat(cluster: &DevCluster, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/chat/completions", cluster.base_url))
        .bearer_auth(&cluster.api_key)
        .json(body)
        .send()
        .await
        .expect("router answers")
}

/// Reads an SSE body to its end and returns the `data:` payloads in order.
pub async fn read_sse(response: reqwest::Response) -> Vec<String> {
    let text = response.text().await.expect("stream body");
    text.split("\n\n")
        .filter_map(|event| event.trim().strip_prefix("data:"))
        .map(|data| data.trim().to_owned())
        .collect()
}

/// Concatenates the `delta.content` of every chunk payload.
pub fn streamed_text(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|event| serde_json::from_str::<Value>(event).ok())
        .filter_map(|chunk| {
            chunk
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}

pub async fn balance(cluster: &DevCluster) -> MicroUsd {
    cluster
        .ledger
        .balance(&cluster.account)
        .await
        .expect("dev account")
        .balance
}

/// Part of the dev account's balance reserved by open holds.
pub async fn held(cluster: &DevCluster) -> MicroUsd {
    cluster
        .ledger
        .balance(&cluster.account)
        .await
        .expect("dev account")
        .held
}

pub async fn earnings(cluster: &DevCluster) -> MicroUsd {
    cluster
        .ledger
        .earnings(&cluster.provider_account)
        .await
        .expect("provider account")
}

/// Waits for a condition that a background task makes true, failing after 10 s.
pub async fn eventually(what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
