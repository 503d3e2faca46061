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

    // A router that knows no node except through the bus.
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
