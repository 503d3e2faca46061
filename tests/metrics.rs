//! Prometheus metrics on the router and the nodes.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use serde_json::json;

use common::MODEL;

async fn scrape(url: &str) -> String {
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"),
        "Prometheus text format"
    );
    response.text().await.unwrap()
}

/// Sums the values of the lines of `text` that start with `series`.
fn sum_of(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(series))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn requests_show_in_metrics() {
    let cluster = common::start(common::options(0)).await;
    let _provider = common::add_provider(&cluster, &[MODEL], |_| {}).await;

    assert_eq!(
        common::post_chat(&cluster, &common::chat_body(false))
            .await
            .status(),
        200
    );
    let mut unknown = common::chat_body(false);
    unknown["model"] = json!("no/such-model");
    assert_eq!(common::post_chat(&cluster, &unknown).await.status(), 404);

    let router = scrape(&format!("http://{}/metrics", cluster.router_address)).await;
    assert_eq!(
        sum_of(
            &router,
            "switchyard_router_http_requests_total{route=\"/v1/chat/completions\",status=\"200\"}"
        ),
        1.0,
        "{router}"
    );
    assert_eq!(
        sum_of(
            &router,
            "switchyard_router_http_requests_total{route=\"/v1/chat/completions\",status=\"404\"}"
        ),
        1.0
    );
    assert_eq!(
        sum_of(
            &router,
            "switchyard_router_http_request_duration_seconds_count{route=\"/v1/chat/completions\"}"
        ),
        2.0
    );

    let mut completed = 0.0;
    let mut providers = 0.0;
    let mut free_slots = 0.0;
    for node in &cluster.router.config.nodes {
        let text = scrape(&format!("{}/metrics", node.base_url)).await;
        completed += sum_of(
            &text,
            "switchyard_node_requests_total{outcome=\"completed\"}",
        );
        providers += sum_of(
            &text,
            &format!("switchyard_node_providers{{model=\"{MODEL}\"}}"),
        );
        free_slots += sum_of(
            &text,
            &format!("switchyard_node_free_slots{{model=\"{MODEL}\"}}"),
        );
    }
    assert_eq!(completed, 1.0);
    assert_eq!(providers, 1.0);
    assert!(free_slots >= 1.0);
    cluster.shutdown().await;
}
