//! Invalid requests: each gets an OpenAI-style error with the right status, and
//! nothing is held or charged.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use serde_json::{Value, json};
use switchyard::dev::DevCluster;
use switchyard_shared::catalog::Catalog;
use switchyard_shared::money::MicroUsd;

use common::MODEL;

/// One invalid request and the error it must get.
struct Case {
    name: &'static str,
    key: Option<String>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    expected: Expected,
}

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

    assert_eq!(common::held(cluster).await.get(), 0, "nothing held");
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
    let messages = json!([{"role": "user", "content": "hi"}]);

    let api_key = Some(cluster.api_key.clone());
    let wrong_key = Some("sy_not_a_real_key".to_owned());
    let json = Some("application/json");
    let valid = |model: &str| json_bytes(json!({"model": model, "messages": messages}));
    let balance = common::balance(&cluster).await;

    let cases = vec![
        Case {
            name: "invalid JSON",
            key: api_key.clone(),
            content_type: json,
            body: b"{\"model\":".to_vec(),
            expected: Expected {
                status: 400,
                code: "invalid_json",
                param: None,
            },
        },
        Case {
            name: "form body",
            key: api_key.clone(),
            content_type: Some("application/x-www-form-urlencoded"),
            body: b"model=x".to_vec(),
            expected: Expected {
                status: 415,
                code: "unsupported_media_type",
                param: None,
            },
        },
        Case {
            name: "missing model",
            key: api_key.clone(),
            content_type: json,
            body: json_bytes(json!({"messages": messages})),
            expected: Expected {
                status: 400,
                code: "invalid_request",
                param: Some("model"),
            },
        },
        Case {
            name: "empty model",
            key: api_key.clone(),
            content_type: json,
            body: valid(""),
            expected: Expected {
                status: 400,
                code: "invalid_request",
                param: Some("model"),
            },
        },
        Case {
            name: "missing messages",
            key: api_key.clone(),
            content_type: json,
            body: json_bytes(json!({"model": MODEL})),
            expected: Expected {
                status: 400,
                code: "invalid_request",
                param: Some("messages"),
            },
        },
        Case {
            name: "empty messages",
            key: api_key.clone(),
            content_type: json,
            body: json_bytes(json!({"model": MODEL, "messages": []})),
            expected: Expected {
                status: 400,
                code: "invalid_request",
                param: Some("messages"),
            },
        },
        Case {
            name: "unknown model",
            key: api_key.clone(),
            content_type: json,
            body: valid("no/such-model"),
            expected: Expected {
                status: 404,
                code: "model_not_found",
                param: None,
            },
        },
        Case {
            name: "missing key",
            key: None,
            content_type: json,
            body: valid(MODEL),
            expected: Expected {
                status: 401,
                code: "invalid_api_key",
                param: None,
            },
        },
        Case {
            name: "wrong key",
            key: wrong_key,
            content_type: json,
            body: valid(MODEL),
            expected: Expected {
                status: 401,
                code: "invalid_api_key",
                param: None,
            },
        },
        Case {
            name: "oversized body",
            key: api_key.clone(),
            content_type: json,
            body: json_bytes(
                json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(5000)}]}),
            ),
            expected: Expected {
                status: 413,
                code: "payload_too_large",
                param: None,
            },
        },
    ];

    for case in cases {
        println!("case: {}", case.name);
        let response = send(&cluster, case.key.as_deref(), case.content_type, case.body).await;
        assert_rejected(&cluster, response, case.expected).await;
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
