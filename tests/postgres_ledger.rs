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
use switchyard_shared::ledger::{HoldRequest, Ledger as _, Outcome};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_manages_accounts() {
    let database = TestDatabase::create().await.unwrap();
    let mut options = common::options(0);
    options.admin_token = Some("admin-secret".to_owned());
    let cluster = start_on(&database, options).await;
    let _provider = common::add_provider(&cluster, &[MODEL], |_| {}).await;
    let client = reqwest::Client::new();
    let admin = |path: &str| format!("http://{}/admin/v1/{path}", cluster.router_address);
    let api = |path: &str| format!("http://{}/v1/{path}", cluster.router_address);

    // Wrong token: rejected, nothing created.
    let response = client
        .post(admin("accounts"))
        .bearer_auth("wrong")
        .json(&json!({"id": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    let response = client
        .post(admin("accounts"))
        .bearer_auth("admin-secret")
        .json(&json!({"id": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let response = client
        .post(admin("accounts/acme/credits"))
        .bearer_auth("admin-secret")
        .json(&json!({"amount_usd": "0.05", "reference": "deposit-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // The same reference again adds nothing.
    client
        .post(admin("accounts/acme/credits"))
        .bearer_auth("admin-secret")
        .json(&json!({"amount_usd": "0.05", "reference": "deposit-1"}))
        .send()
        .await
        .unwrap();
    let bad = client
        .post(admin("accounts/acme/credits"))
        .bearer_auth("admin-secret")
        .json(&json!({"amount_usd": "0.0000001", "reference": "deposit-2"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        bad.json::<serde_json::Value>().await.unwrap()["error"]["param"],
        "amount_usd"
    );

    let issued: serde_json::Value = client
        .post(admin("accounts/acme/keys"))
        .bearer_auth("admin-secret")
        .json(&json!({"name": "ci"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = issued["key"].as_str().unwrap().to_owned();
    let prefix = issued["display_prefix"].as_str().unwrap().to_owned();

    let account: serde_json::Value = client
        .get(api("account"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(account["id"], "acme");
    assert_eq!(account["balance_micro_usd"], 50_000);

    // New prices apply to the next request.
    let response = client
        .put(admin(&format!("models/{MODEL}")))
        .bearer_auth("admin-secret")
        .json(&json!({"input_per_mtok": 1_000_000, "output_per_mtok": 2_000_000, "min_charge": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    common::eventually("every node uses the new prices", async || {
        cluster
            .nodes
            .iter()
            .all(|node| node.catalog.get(MODEL).unwrap().input_per_mtok == 1_000_000)
    })
    .await;
    let body = json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "one two three"}]});
    let response = client
        .post(api("chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let usage = cluster
        .ledger
        .usage(&switchyard_shared::ids::AccountId::from("acme"), 1, None)
        .await
        .unwrap();
    let expected = usage[0].prompt_tokens + 2 * usage[0].completion_tokens;
    assert_eq!(
        usage[0].cost,
        MicroUsd::new(expected as i64),
        "1 and 2 micro-USD per token"
    );

    let history: serde_json::Value = client
        .get(api("account/usage?limit=5"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(history["data"].as_array().unwrap().len(), 1);
    assert_eq!(history["data"][0]["cost_micro_usd"], expected);

    let revoked = client
        .delete(admin(&format!("keys/{prefix}")))
        .bearer_auth("admin-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let response = client
        .get(api("account"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        401,
        "a revoked key stops working on the router that revoked it"
    );

    cluster.shutdown().await;
    database.drop_database().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_settle_once() {
    let database = TestDatabase::create().await.unwrap();
    // Two ledgers with their own pools stand for two nodes.
    let first = database.ledger(4).unwrap();
    let second = database.ledger(4).unwrap();
    let consumer = switchyard_shared::ids::AccountId::from("consumer");
    first.create_account(&consumer).await.unwrap();
    first
        .credit(&consumer, MicroUsd::new(1_000_000), "seed")
        .await
        .unwrap();

    for index in 0..20 {
        let request_id = ConsumerRequestId::new(format!("r{index}"));
        first
            .place_hold(HoldRequest {
                request_id: request_id.clone(),
                account_id: consumer.clone(),
                key_prefix: String::new(),
                amount: MicroUsd::new(1_000),
                node_id: NodeId::from("coordinator-0"),
            })
            .await
            .unwrap();
        let settlement = switchyard_shared::ledger::Settlement {
            request_id,
            model: switchyard_shared::ids::ModelId::from(MODEL),
            prompt_tokens: 10,
            completion_tokens: 10,
            cost: MicroUsd::new(700),
            platform_fee_bps: 500,
            provider_account: None,
            provider_key: "key".to_owned(),
            node_id: NodeId::from("coordinator-0"),
            outcome: Outcome::Completed,
        };
        let (a, b) = tokio::join!(first.settle(settlement.clone()), second.settle(settlement));
        assert_eq!(a.unwrap(), b.unwrap(), "both nodes see the same receipt");
    }

    let balance = first.balance(&consumer).await.unwrap();
    assert_eq!(
        balance.balance,
        MicroUsd::new(1_000_000 - 20 * 700),
        "each request charged once"
    );
    assert_eq!(balance.held, MicroUsd::ZERO);
    assert_eq!(
        first.entries_total(&consumer).await.unwrap(),
        balance.available()
    );
    drop((first, second));
    database.drop_database().await.unwrap();
}
