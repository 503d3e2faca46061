//! What routers share over Redis: rate limits, and revocations of API keys.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::sync::Arc;

use switchyard_router::RouterState;
use switchyard_router::rate_limit::DefaultLimits;

fn redis_url() -> String {
    std::env::var("SWITCHYARD_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

async fn post(base: &str, key: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .json(&common::chat_body(false))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_shared_by_two_routers() {
    let prefix = format!("switchyard-test:{}:", uuid_hex());
    let mut options = common::options(0);
    options.redis_url = Some(redis_url());
    options.redis_key_prefix = prefix.clone();
    options.default_limits = DefaultLimits {
        requests_per_minute: 4,
        tokens_per_minute: 0,
    };
    let cluster = common::start(options).await;
    let _provider = common::add_provider(&cluster, &[common::MODEL], |_| {}).await;

    // A second router on the same nodes, ledger, catalog and Redis prefix.
    let second = RouterState::new(
        cluster.router.config.clone(),
        cluster.router.catalog.clone(),
        cluster.ledger.clone(),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let second_base = format!("http://{}/v1", listener.local_addr().unwrap());
    let server = tokio::spawn(switchyard_router::serve(listener, Arc::clone(&second)));

    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(post(&cluster.base_url, &cluster.api_key).await);
        statuses.push(post(&second_base, &cluster.api_key).await);
    }
    let accepted: Vec<_> = statuses
        .iter()
        .filter(|response| response.status() == 200)
        .collect();
    let refused: Vec<_> = statuses
        .iter()
        .filter(|response| response.status() == 429)
        .collect();
    assert_eq!(
        accepted.len(),
        4,
        "the two routers together accept the limit"
    );
    assert_eq!(refused.len(), 4);

    let first_accepted = accepted[0].headers();
    assert_eq!(first_accepted["x-ratelimit-limit-requests"], "4");
    assert_eq!(first_accepted["x-ratelimit-remaining-requests"], "3");
    let refusal = refused[0].headers();
    assert!(refusal.contains_key("retry-after"));

    second.shutdown.cancel();
    server.await.unwrap().unwrap();
    cluster.shutdown().await;
}

fn uuid_hex() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{nanos:x}-{}", std::process::id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_key_stops_on_every_router() {
    let prefix = format!("switchyard-test:{}:", uuid_hex());
    let mut options = common::options(0);
    options.redis_url = Some(redis_url());
    options.redis_key_prefix = prefix.clone();
    options.admin_token = Some("admin-secret".to_owned());
    let cluster = common::start(options).await;
    let _provider = common::add_provider(&cluster, &[common::MODEL], |_| {}).await;
    let second = RouterState::new(
        cluster.router.config.clone(),
        cluster.router.catalog.clone(),
        cluster.ledger.clone(),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let second_base = format!("http://{}/v1", listener.local_addr().unwrap());
    let server = tokio::spawn(switchyard_router::serve(listener, Arc::clone(&second)));

    let issued = cluster
        .ledger
        .issue_api_key(&cluster.account, "to-revoke")
        .await
        .unwrap();
    // Both routers now hold the key in their caches.
    assert_eq!(post(&cluster.base_url, &issued.secret).await.status(), 200);
    assert_eq!(post(&second_base, &issued.secret).await.status(), 200);

    // Wait until both routers listen for revocations.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("{prefix}key-revocations");
    common::eventually("both routers subscribe", async || {
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(&mut connection)
            .await
            .unwrap();
        counts
            .first()
            .is_some_and(|(_, subscribers)| *subscribers >= 2)
    })
    .await;

    let revoked = reqwest::Client::new()
        .delete(format!(
            "http://{}/admin/v1/keys/{}",
            cluster.router_address, issued.display_prefix
        ))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);

    let started = std::time::Instant::now();
    common::eventually("the other router rejects the key", async || {
        post(&second_base, &issued.secret).await.status() == 401
    })
    .await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );

    second.shutdown.cancel();
    server.await.unwrap().unwrap();
    cluster.shutdown().await;
}
