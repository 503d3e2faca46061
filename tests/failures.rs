//! Provider and consumer failures: failover before the first content chunk, an
//! error event after it, and cancellation when the consumer leaves.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use switchyard_loadtest::sim::{Behavior, SimProvider, simulated_completion_text};
use switchyard_shared::ids::ModelId;

use common::MODEL;

/// Free slots of `MODEL` over all nodes.
fn free_slots(cluster: &switchyard::dev::DevCluster) -> usize {
    cluster
        .nodes
        .iter()
        .flat_map(|node| node.scheduler.model_capacity())
        .filter(|capacity| capacity.model == ModelId::from(MODEL))
        .map(|capacity| capacity.free_slots)
        .sum()
}

#[tokio::test]
async fn error_before_first_chunk_fails_over() {
    let cluster = common::start(common::options(0)).await;
    // Both providers serve only MODEL, so both live on its home node.
    let failing = common::add_provider(&cluster, &[MODEL], |config| {
        config.behavior = Behavior::FailBeforeFirstChunk { status_code: 503 };
    })
    .await;
    let healthy = common::add_provider(&cluster, &[MODEL], |_| {}).await;
    let before = common::balance(&cluster).await;

    // Concurrent requests spread over both providers, so the failing one is tried.
    let requests = (0..4).map(|_| async {
        let response = common::post_chat(&cluster, &common::chat_body(true)).await;
        assert_eq!(response.status(), 200);
        common::streamed_text(&common::read_sse(response).await)
    });
    for text in futures::future::join_all(requests).await {
        assert_eq!(text, simulated_completion_text(16));
    }

    assert!(
        failing.stats().errors_sent >= 1,
        "the failing provider was tried"
    );
    assert_eq!(healthy.stats().completed, 4);
    let entry = cluster.router.catalog.get(MODEL).unwrap();
    let prompt = switchyard_loadtest::sim::count_prompt_tokens(&common::chat_body(true));
    let cost = entry.prices().cost(prompt, 16);
    assert_eq!(
        common::balance(&cluster).await,
        before - cost - cost - cost - cost,
        "each request charged once"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn provider_drop_mid_stream_ends_with_error() {
    let cluster = common::start(common::options(0)).await;
    let provider = common::add_provider(&cluster, &[MODEL], |config| {
        config.behavior = Behavior::DropAfterChunks(3);
    })
    .await;
    let before = common::balance(&cluster).await;

    let response = common::post_chat(&cluster, &common::chat_body(true)).await;
    assert_eq!(response.status(), 200);
    let events = common::read_sse(response).await;

    assert_eq!(common::streamed_text(&events), simulated_completion_text(3));
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "provider_error", "{last}");
    assert!(
        !events.iter().any(|event| event == "[DONE]"),
        "no [DONE] after an error"
    );
    assert!(
        events
            .iter()
            .all(|event| !event.contains("\"finish_reason\":\"stop\""))
    );

    assert_eq!(provider.stats().connections_dropped, 1);
    assert_eq!(
        common::balance(&cluster).await,
        before,
        "provider fault is not charged"
    );
    assert_eq!(
        common::earnings(&cluster).await.get(),
        0,
        "and earns nothing"
    );
    assert_eq!(common::held(&cluster).await.get(), 0);
    cluster.shutdown().await;
}

#[tokio::test]
async fn provider_drop_non_streaming_is_bad_gateway() {
    let cluster = common::start(common::options(0)).await;
    let _provider = common::add_provider(&cluster, &[MODEL], |config| {
        config.behavior = Behavior::DropAfterChunks(1);
    })
    .await;
    let before = common::balance(&cluster).await;

    let response = common::post_chat(&cluster, &common::chat_body(false)).await;
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "provider_error");
    assert_eq!(common::balance(&cluster).await, before);
    assert_eq!(common::held(&cluster).await.get(), 0);
    cluster.shutdown().await;
}

#[tokio::test]
async fn plaintext_chunk_fails_over_and_untrusts() {
    let cluster = common::start(common::options(0)).await;
    let plaintext = common::add_provider(&cluster, &[MODEL], |config| {
        config.behavior = Behavior::PlaintextChunks;
    })
    .await;
    let _honest = common::add_provider(&cluster, &[MODEL], |_| {}).await;

    let requests = (0..3).map(|_| async {
        let response = common::post_chat(&cluster, &common::chat_body(false)).await;
        assert_eq!(response.status(), 200);
    });
    futures::future::join_all(requests).await;

    // Once untrusted, the plaintext provider gets no more requests.
    let seen = plaintext.stats().requests_received;
    assert!(seen >= 1);
    for _ in 0..3 {
        assert_eq!(
            common::post_chat(&cluster, &common::chat_body(false))
                .await
                .status(),
            200
        );
    }
    assert_eq!(plaintext.stats().requests_received, seen);
    cluster.shutdown().await;
}

#[tokio::test]
async fn consumer_disconnect_cancels_provider() {
    // Prices high enough that every token shows in the charge.
    let mut options = common::options(0);
    options.catalog = switchyard_shared::catalog::Catalog::from_json(&format!(
        r#"{{"models":[{{"id":"{MODEL}","input_per_mtok":1000000,"output_per_mtok":10000000,"min_charge":0}}]}}"#
    ))
    .unwrap();
    let cluster = common::start(options).await;
    let provider: SimProvider = common::add_provider(&cluster, &[MODEL], |config| {
        config.token_rate = 20.0;
        config.completion_tokens = 200;
    })
    .await;
    let all_free = free_slots(&cluster);
    let before = common::balance(&cluster).await;

    let mut body = common::chat_body(true);
    body["max_tokens"] = json!(200);
    let response = common::post_chat(&cluster, &body).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut received = String::new();
    while !received.contains("tok1 ") {
        let bytes = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        received.push_str(&String::from_utf8_lossy(&bytes));
    }
    assert_eq!(
        free_slots(&cluster),
        all_free - 1,
        "a slot is taken while streaming"
    );
    drop(stream);

    let stats = tokio::time::timeout(
        Duration::from_secs(10),
        provider.wait_until(|stats| !stats.cancelled_request_ids.is_empty()),
    )
    .await
    .expect("provider receives cancel");
    assert!(stats.completed == 0, "generation stopped before completion");
    common::eventually("the slot is free again", async || {
        free_slots(&cluster) == all_free
    })
    .await;
    common::eventually("the hold is settled", async || {
        common::held(&cluster).await.get() == 0
    })
    .await;

    // Charged for the prompt and the tokens delivered (each 10 micro-USD): at least
    // the two tokens the consumer read, far less than the whole answer.
    let charged = (before - common::balance(&cluster).await).get();
    assert!(
        charged >= 2 * 10,
        "delivered content is charged, got {charged}"
    );
    assert!(charged < 200 * 10, "charged {charged} for a partial answer");
    assert!(
        common::earnings(&cluster).await.get() > 0,
        "provider paid for delivered tokens"
    );
    cluster.shutdown().await;
}
