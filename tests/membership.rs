//! Routing by live membership: nodes announce themselves on the cluster bus and
//! routers find them there, with no static node list.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use switchyard_router::RouterState;

use common::MODEL;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_finds_nodes_on_bus() {
    let cluster = common::start(common::options(0)).await;
    let _provider = common::add_provider(&cluster, &[MODEL], |_| {}).await;

    // A router with no node list: it finds nodes through the bus only.
    let mut config = cluster.router.config.clone();
    config.nodes.clear();
    let router = RouterState::with_bus(
        config,
        cluster.router.catalog.clone(),
        cluster.ledger.clone(),
        cluster.bus.clone(),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    let server = tokio::spawn(switchyard_router::serve(listener, Arc::clone(&router)));

    common::eventually("the router sees three members", async || {
        router.view.members().len() == 3
    })
    .await;
    let response = reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(&cluster.api_key)
        .json(&common::chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // A provider connecting through this router lands on a live node too.
    let mut config = switchyard_loadtest::sim::SimProviderConfig::new(
        base.replace("http://", "ws://")
            .replace("/v1", "/ws/provider"),
        vec![MODEL.to_owned()],
    );
    config.reconnect = false;
    let _second = switchyard_loadtest::sim::SimProvider::spawn(config);
    cluster
        .wait_for_providers(2, Duration::from_secs(10))
        .await
        .unwrap();

    router.shutdown.cancel();
    server.await.unwrap().unwrap();
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_node_leaves_the_view() {
    let cluster = common::start(common::options(0)).await;
    common::eventually("the router sees three members", async || {
        cluster.router.view.members().len() == 3
    })
    .await;

    let leaving = cluster.nodes[0].config.node_id.clone();
    cluster.nodes[0].shutdown.cancel();
    common::eventually("the stopped node leaves the router's view", async || {
        let members = cluster.router.view.members();
        members.len() == 2 && members.iter().all(|member| member.node_id != leaving)
    })
    .await;
    assert!(
        !cluster.router.view.ring().nodes().contains(&leaving),
        "the ring no longer holds it"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_node_moves_its_providers() {
    let cluster = common::start(common::options(0)).await;
    let models: Vec<String> = cluster
        .router
        .catalog
        .snapshot()
        .enabled()
        .map(|entry| entry.id.to_string())
        .collect();
    let mut providers = Vec::new();
    for index in 0..6 {
        // Different primary models spread the providers over the nodes.
        let mut rotated = models.clone();
        rotated.rotate_left(index % models.len());
        let mut config =
            switchyard_loadtest::sim::SimProviderConfig::new(cluster.provider_url(), rotated);
        config.reconnect_initial_delay = Duration::from_millis(100);
        config.reconnect_max_delay = Duration::from_millis(500);
        providers.push(switchyard_loadtest::sim::SimProvider::spawn(config));
    }
    cluster
        .wait_for_providers(6, Duration::from_secs(10))
        .await
        .unwrap();
    common::eventually("the router sees three members", async || {
        cluster.router.view.members().len() == 3
    })
    .await;

    // Drain the node with the most providers.
    let busiest = cluster
        .nodes
        .iter()
        .max_by_key(|node| node.provider_count())
        .unwrap()
        .clone();
    assert!(busiest.provider_count() > 0);
    let drained = tokio::spawn(switchyard_coordinator::node::drain_and_stop(
        busiest.clone(),
        Duration::from_secs(20),
    ));

    common::eventually("the draining node's providers move away", async || {
        busiest.provider_count() == 0
    })
    .await;
    drained.await.unwrap();
    assert!(
        busiest.metrics.rehomes.value(&[]) > 0,
        "providers were re-homed, not cut off"
    );
    common::eventually("every provider is back on a live node", async || {
        cluster
            .nodes
            .iter()
            .filter(|node| !node.shutdown.is_cancelled())
            .map(|node| node.provider_count())
            .sum::<usize>()
            == 6
    })
    .await;

    // Every model is still served.
    for model in &models {
        let mut body = common::chat_body(false);
        body["model"] = serde_json::json!(model);
        assert_eq!(
            common::post_chat(&cluster, &body).await.status(),
            200,
            "model {model}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_shutdown_drains_and_closes() {
    let cluster = common::start(common::options(0)).await;
    let provider = common::add_provider(&cluster, &[MODEL], |config| {
        config.token_rate = 20.0;
        config.completion_tokens = 20;
    })
    .await;

    // A slow stream is under way when the router is told to stop.
    let mut body = common::chat_body(true);
    body["max_tokens"] = serde_json::json!(20);
    let response = common::post_chat(&cluster, &body).await;
    assert_eq!(response.status(), 200);
    cluster.router.shutdown.cancel();

    // The stream still finishes, and the provider is told to reconnect elsewhere.
    let events = common::read_sse(response).await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "the stream in flight completes"
    );
    tokio::time::timeout(
        Duration::from_secs(10),
        provider.wait_until(|stats| stats.last_close_code == Some(1001)),
    )
    .await
    .expect("the provider gets close code 1001");

    // New connections are refused once the router has stopped.
    common::eventually("the router stops accepting", async || {
        reqwest::get(format!("http://{}/healthz", cluster.router_address))
            .await
            .is_err()
    })
    .await;
    cluster.shutdown().await;
}
