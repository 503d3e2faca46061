//! The cluster with the Postgres ledger: concurrent requests against a small
//! balance, billing of abnormal ends, the stale-hold sweeper, and a Postgres
//! outage in the middle of traffic.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use switchyard::dev::{DevCluster, DevOptions};
use switchyard_coordinator::NodeConfig;
use switchyard_loadtest::sim::Behavior;
use switchyard_shared::ids::{ConsumerRequestId, NodeId};
use switchyard_shared::ledger::test_db::TestDatabase;
use switchyard_shared::ledger::{HoldRequest, Outcome};
use switchyard_shared::money::{FeeSplit, MicroUsd};

use common::MODEL;
use common::proxy::CutProxy;

async fn start_on(database: &TestDatabase, mut options: DevOptions) -> DevCluster {
    options.database_url = Some(database.url.clone());
    common::start(options).await
}

/// Checks that the dev account's entries add up to its available balance and
/// that no hold is left open.
async fn assert_books_balance(cluster: &DevCluster) {
    let balance = cluster.ledger.balance(&cluster.account).await.unwrap();
    assert_eq!(balance.held, MicroUsd::ZERO, "no hold left open");
    assert!(balance.balance >= MicroUsd::ZERO);
    let entries = cluster
        .ledger
        .entries_total(&cluster.account)
        .await
        .unwrap();
    assert_eq!(
        entries,
        balance.available(),
        "ledger entries add up to the balance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_balance_serves_at_most_ten() {
    let database = TestDatabase::create().await.unwrap();
    let mut options = common::options(0);
    // The hold of each request below is exactly 100 micro-USD (the minimum
    // charge), so this balance covers ten of them.
    options.balance = MicroUsd::new(1_000);
    let cluster = start_on(&database, options).await;
    let _providers = [
        common::add_provider(&cluster, &[MODEL], |_| {}).await,
        common::add_provider(&cluster, &[MODEL], |_| {}).await,
    ];

    let body =
        json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]});
    let requests = (0..100).map(|_| common::post_chat(&cluster, &body));
    let statuses: Vec<u16> = futures::future::join_all(requests)
        .await
        .into_iter()
        .map(|response| response.status().as_u16())
        .collect();

    let served = statuses.iter().filter(|status| **status == 200).count();
    assert!(
        served <= 10,
        "{served} requests served with a balance for 10"
    );
    assert!(served >= 1, "some requests are served");
    assert!(
        statuses
            .iter()
            .all(|status| matches!(status, 200 | 402 | 503)),
        "{statuses:?}"
    );
    assert_books_balance(&cluster).await;

    let charged = MicroUsd::new(1_000) - common::balance(&cluster).await;
    assert_eq!(
        charged,
        MicroUsd::new(100 * served as i64),
        "each served request charged once"
    );
    let usage = cluster
        .ledger
        .usage(&cluster.account, 500, None)
        .await
        .unwrap();
    assert_eq!(usage.len(), served);

    cluster.shutdown().await;
    database.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_fault_charges_nothing() {
    let database = TestDatabase::create().await.unwrap();
    let cluster = start_on(&database, common::options(0)).await;
    let _provider = common::add_provider(&cluster, &[MODEL], |config| {
        config.behavior = Behavior::DropAfterChunks(2);
    })
    .await;
    let before = common::balance(&cluster).await;

    let response = common::post_chat(&cluster, &common::chat_body(true)).await;
    let events = common::read_sse(response).await;
    assert!(events.last().unwrap().contains("\"error\""));

    assert_eq!(common::balance(&cluster).await, before);
    assert_eq!(common::earnings(&cluster).await, MicroUsd::ZERO);
    assert!(
        cluster
            .ledger
            .usage(&cluster.account, 10, None)
            .await
            .unwrap()
            .is_empty()
    );
    assert_books_balance(&cluster).await;
    cluster.shutdown().await;
    database.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_charges_once() {
    let database = TestDatabase::create().await.unwrap();
    let cluster = start_on(&database, common::options(0)).await;
    let failing = common::add_provider(&cluster, &[MODEL], |config| {
        config.behavior = Behavior::FailBeforeFirstChunk { status_code: 500 };
    })
    .await;
    let _healthy = common::add_provider(&cluster, &[MODEL], |_| {}).await;
    let before = common::balance(&cluster).await;

    let body = common::chat_body(false);
    let requests = (0..2).map(|_| common::post_chat(&cluster, &body));
    for response in futures::future::join_all(requests).await {
        assert_eq!(response.status(), 200);
    }
    assert!(failing.stats().errors_sent >= 1);

    let entry = cluster.router.catalog.get(MODEL).unwrap();
    let prompt = switchyard_loadtest::sim::count_prompt_tokens(&common::chat_body(false));
    let cost = entry.prices().cost(prompt, 16);
    assert_eq!(before - common::balance(&cluster).await, cost + cost);
    let split = FeeSplit::of(cost, cluster.router.catalog.platform_fee_bps());
    assert_eq!(
        common::earnings(&cluster).await,
        split.provider_earning + split.provider_earning
    );
    assert_books_balance(&cluster).await;
    cluster.shutdown().await;
    database.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_charges_delivered_tokens() {
    let database = TestDatabase::create().await.unwrap();
    let cluster = start_on(&database, common::options(0)).await;
    let provider = common::add_provider(&cluster, &[MODEL], |config| {
        config.token_rate = 20.0;
        config.completion_tokens = 200;
    })
    .await;
    let before = common::balance(&cluster).await;

    let mut body = common::chat_body(true);
    body["max_tokens"] = json!(200);
    let response = common::post_chat(&cluster, &body).await;
    let mut stream = response.bytes_stream();
    let mut received = String::new();
    while !received.contains("tok2 ") {
        let bytes = stream.next().await.unwrap().unwrap();
        received.push_str(&String::from_utf8_lossy(&bytes));
    }
    drop(stream);
    tokio::time::timeout(
        Duration::from_secs(10),
        provider.wait_until(|stats| !stats.cancelled_request_ids.is_empty()),
    )
    .await
    .unwrap();
    common::eventually("the request is settled", async || {
        !cluster
            .ledger
            .usage(&cluster.account, 1, None)
            .await
            .unwrap()
            .is_empty()
    })
    .await;

    let record = cluster
        .ledger
        .usage(&cluster.account, 1, None)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(record.outcome, Outcome::ConsumerDisconnected);
    assert!(
        record.completion_tokens >= 3,
        "at least the tokens the consumer read"
    );
    assert!(record.completion_tokens < 200);
    let entry = cluster.router.catalog.get(MODEL).unwrap();
    let cost = entry
        .prices()
        .cost(record.prompt_tokens, record.completion_tokens);
    assert_eq!(record.cost, cost);
    assert_eq!(
        before - common::balance(&cluster).await,
        cost,
        "charged exactly the delivered part"
    );
    let split = FeeSplit::of(cost, cluster.router.catalog.platform_fee_bps());
    assert_eq!(common::earnings(&cluster).await, split.provider_earning);
    assert_books_balance(&cluster).await;
    cluster.shutdown().await;
    database.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_releases_dead_node_holds() {
    let database = TestDatabase::create().await.unwrap();
    let mut options = common::options(0);
    let mut node = NodeConfig::new(NodeId::from("template"), String::new());
    node.hold_timeout = Duration::from_millis(300);
    node.sweep_interval = Duration::from_millis(100);
    options.node_template = Some(node);
    let cluster = start_on(&database, options).await;
    let _provider = common::add_provider(&cluster, &[MODEL], |_| {}).await;
    let before = common::balance(&cluster).await;

    // A hold left by a node that died before settling.
    let orphan = ConsumerRequestId::from("orphaned-request");
    cluster
        .ledger
        .place_hold(HoldRequest {
            request_id: orphan.clone(),
            account_id: cluster.account.clone(),
            key_prefix: String::new(),
            amount: MicroUsd::new(5_000),
            node_id: NodeId::from("coordinator-dead"),
        })
        .await
        .unwrap();
    assert_eq!(common::held(&cluster).await, MicroUsd::new(5_000));

    // A request that completes is settled and stays settled.
    assert_eq!(
        common::post_chat(&cluster, &common::chat_body(false))
            .await
            .status(),
        200
    );
    let charged = before - common::balance(&cluster).await;
    assert!(charged > MicroUsd::ZERO);

    common::eventually("the sweeper releases the orphaned hold", async || {
        common::held(&cluster).await == MicroUsd::ZERO
    })
    .await;
    assert_eq!(
        before - common::balance(&cluster).await,
        charged,
        "the settled charge is untouched"
    );
    assert_books_balance(&cluster).await;
    cluster.shutdown().await;
    database.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_gives_503_then_recovers() {
    let database = TestDatabase::create().await.unwrap();
    let proxy = CutProxy::start(SocketAddr::from(([127, 0, 0, 1], 5432))).await;
    let proxied_url = database
        .url
        .replace("127.0.0.1:5432", &proxy.address.to_string());
    assert_ne!(
        proxied_url, database.url,
        "the test database URL goes through the proxy"
    );

    let mut options = common::options(0);
    options.database_url = Some(proxied_url);
    let cluster = common::start(options).await;
    let _provider = common::add_provider(&cluster, &[MODEL], |_| {}).await;
    let readyz = format!("http://{}/readyz", cluster.router_address);
    let client = reqwest::Client::new();

    let mut served = 0;
    for _ in 0..5 {
        assert_eq!(
            common::post_chat(&cluster, &common::chat_body(false))
                .await
                .status(),
            200
        );
        served += 1;
    }
    assert_eq!(client.get(&readyz).send().await.unwrap().status(), 200);

    proxy.cut();
    for _ in 0..5 {
        let response = common::post_chat(&cluster, &common::chat_body(false)).await;
        assert_eq!(
            response.status(),
            503,
            "no hold can be placed without Postgres"
        );
        assert!(response.headers().contains_key("retry-after"));
    }
    assert_eq!(
        client.get(&readyz).send().await.unwrap().status(),
        503,
        "readiness fails"
    );

    proxy.restore().await;
    common::eventually("the router is ready again", async || {
        client.get(&readyz).send().await.unwrap().status() == 200
    })
    .await;
    common::eventually("requests succeed again", async || {
        common::post_chat(&cluster, &common::chat_body(false))
            .await
            .status()
            == 200
    })
    .await;
    served += 1;

    // Every served request is billed once, and nothing else.
    let usage = cluster
        .ledger
        .usage(&cluster.account, 500, None)
        .await
        .unwrap();
    assert_eq!(usage.len(), served);
    let billed: i64 = usage.iter().map(|record| record.cost.get()).sum();
    assert_eq!(
        MicroUsd::from_usd(100) - common::balance(&cluster).await,
        MicroUsd::new(billed)
    );
    assert_books_balance(&cluster).await;
    cluster.shutdown().await;
    proxy.cut();
    database.drop_database().await.unwrap();
}

#[tokio::test]
async fn roles_refuse_unknown_schema() {
    let database = TestDatabase::create().await.unwrap();
    let ledger = database.ledger(2).unwrap();
    ledger.check_schema().await.unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations")
        .execute(ledger.pool())
        .await
        .unwrap();
    let error = ledger.check_schema().await.unwrap_err();
    assert!(error.to_string().contains("switchyard migrate"), "{error}");
    drop(ledger);
    database.drop_database().await.unwrap();
}
