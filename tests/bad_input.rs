//! Invalid requests: each gets an OpenAI-style error with the right status, and
//! nothing is held or charged.

mod common;

use serde_json::{Value, json};
use switchyard::dev::DevCluster;
use switchyard_shared::catalog::Catalog;
use switchyard_shared::money::MicroUsd;

use common::MODEL;

struct Expected {
    status: u16,
    code: &'static str,
    param: Option<&'static str>,
}

async fn send(
    cluster: &DevCluster,
    key: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut request = reqwest::Client::new().post(format!("{}/chat/completions", cluster.base_url));
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request.body(body).send().await.unwrap()
}

/// Checks the status, the error body and that the ledger did not move.
async fn assert_rejected(cluster: &DevCluster, response: reqwest::Response, expected: Expected) {
    let before = common::balance(cluster).await;
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").cloned();
    let body: Value = response.json().await.unwrap();

    assert_eq!(status, expected.status, "{body}");
    assert_eq!(body["error"]["code"], expected.code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|message| !message.is_empty())
    );
    assert!(body["error"]["type"].is_string());
    if let Some(param) = expected.param {
        assert_eq!(body["error"]["param"], param, "{body}");
    }
    if matches!(status, 429 | 503) {
        assert!(retry_after.is_some(), "{status} needs Retry-After");
    }

    assert_eq!(cluster.ledger.open_holds(), 0, "nothing held");
    assert_eq!(common::balance(cluster).await, before, "nothing charged");
}

fn json_bytes(value: Value) -> Vec<u8> {
    serde_json::to_vec(&value).unwrap()
}

#[tokio::test]
async fn malformed_requests_are_rejected() {
    let mut options = common::options(1);
    options.max_body_bytes = 4096;
    let cluster = common::start(options).await;
    let key = Some(cluster.api_key.as_str());
    let json = Some("application/json");
    let messages = json!([{"role": "user", "content": "hi"}]);
    let balance = common::balance(&cluster).await;

    let cases: Vec<(&str, Option<&str>, Option<&str>, Vec<u8>, Expected)> = vec![
        (
            "invalid JSON",
            key,
            json,
            b"{\"model\":".to_vec(),
            Expected {
                status: 400,
                code: "invalid_json",
                param: None,
            },
        ),
        (
            "form body",
            key,
            Some("application/x-www-form-urlencoded"),
            b"model=x".to_vec(),
            Expected {
                status: 415,
                code: "unsupported_media_type",
                param: None,
            },
        ),
        (
            "missing model",
            key,
            json,
            json_bytes(json!({"messages": messages})),
            Expected {
                status: 400,
                code: "invalid_request",
                param: Some("model"),
            },
        ),
        (
            "empty model",
            key,
            json,
            json_bytes(json!({"model": "", "messages": messages})),
            Expected {
                status: 400,
                code: "invalid_request",
                param: Some("model"),
            },
        ),
        (
            "missing messages",
            key,
            json,
            json_bytes(json!({"model": MODEL})),
            Expected {
                status: 400,
                code: "invalid_request",
                param: Some("messages"),
            },
        ),
        (
            "empty messages",
            key,
            json,
            json_bytes(json!({"model": MODEL, "messages": []})),
            Expected {
                status: 400,
                code: "invalid_request",
                param: Some("messages"),
            },
        ),
        (
            "unknown model",
            key,
            json,
            json_bytes(json!({"model": "no/such-model", "messages": messages})),
            Expected {
                status: 404,
                code: "model_not_found",
                param: None,
            },
        ),
        (
            "missing key",
            None,
            json,
            json_bytes(json!({"model": MODEL, "messages": messages})),
            Expected {
                status: 401,
                code: "invalid_api_key",
                param: None,
            },
        ),
        (
            "wrong key",
            Some("sy_not_a_real_key"),
            json,
            json_bytes(json!({"model": MODEL, "messages": messages})),
            Expected {
                status: 401,
                code: "invalid_api_key",
                param: None,
            },
        ),
        (
            "oversized body",
            key,
            json,
            json_bytes(
                json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(5000)}]}),
            ),
            Expected {
                status: 413,
                code: "payload_too_large",
                param: None,
            },
        ),
    ];

    for (name, key, content_type, body, expected) in cases {
        println!("case: {name}");
        let response = send(&cluster, key, content_type, body).await;
        assert_rejected(&cluster, response, expected).await;
    }
    assert_eq!(common::balance(&cluster).await, balance);
    cluster.shutdown().await;
}

#[tokio::test]
async fn anthropic_style_key_is_accepted() {
    let cluster = common::start(common::options(1)).await;
    let response = reqwest::Client::new()
        .post(format!("{}/chat/completions", cluster.base_url))
        .header("x-api-key", &cluster.api_key)
        .json(&common::chat_body(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    cluster.shutdown().await;
}

#[tokio::test]
async fn model_without_provider_is_unavailable() {
    let catalog = Catalog::from_json(&format!(
        r#"{{"models":[
            {{"id":"{MODEL}","input_per_mtok":23000,"output_per_mtok":75000,"min_charge":100}},
            {{"id":"org/unserved","input_per_mtok":1000,"output_per_mtok":1000}}
        ]}}"#
    ))
    .unwrap();
    let mut options = common::options(0);
    options.catalog = catalog;
    let cluster = common::start(options).await;
    let _provider = common::add_provider(&cluster, &[MODEL], |_| {}).await;

    let mut body = common::chat_body(false);
    body["model"] = json!("org/unserved");
    let response = common::post_chat(&cluster, &body).await;
    assert_rejected(
        &cluster,
        response,
        Expected {
            status: 503,
            code: "no_capacity",
            param: None,
        },
    )
    .await;

    // The served model still works on the same cluster.
    assert_eq!(
        common::post_chat(&cluster, &common::chat_body(false))
            .await
            .status(),
        200
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn low_balance_is_payment_required() {
    let mut options = common::options(1);
    // Less than the hold for the default limit of 8,192 completion tokens.
    options.balance = MicroUsd::new(300);
    let cluster = common::start(options).await;

    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let response = common::post_chat(&cluster, &body).await;
    assert_rejected(
        &cluster,
        response,
        Expected {
            status: 402,
            code: "insufficient_funds",
            param: None,
        },
    )
    .await;
    assert_eq!(common::balance(&cluster).await, MicroUsd::new(300));

    // A request small enough for the balance goes through.
    let mut small = body.clone();
    small["max_tokens"] = json!(8);
    assert_eq!(common::post_chat(&cluster, &small).await.status(), 200);
    assert!(common::balance(&cluster).await < MicroUsd::new(300));
    cluster.shutdown().await;
}
