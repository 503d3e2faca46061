//! Forwarding consumer requests to coordinator nodes.
//!
//! The router picks candidates by the model's place on the ring, sends the
//! original body with the internal envelope, and streams the node's answer back
//! without buffering it. A node that cannot serve the model says so before any
//! byte of the answer (503 with the retry-elsewhere header), and so does a node
//! that cannot be reached; in both cases the router tries the next candidate.

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use switchyard_shared::api::{ApiError, ErrorKind};
use switchyard_shared::ids::{AccountId, ConsumerRequestId};
use switchyard_shared::internal::{self, ApiKind};
use tracing::{debug, warn};

use crate::state::RouterState;

/// Nodes tried per request: the first candidate and at most two more.
const MAX_NODES_TRIED: usize = 3;

/// The request fields the router forwards to a node.
pub struct Forward<'a> {
    pub request_id: &'a ConsumerRequestId,
    pub account_id: &'a AccountId,
    pub key_prefix: &'a str,
    pub api_kind: ApiKind,
    pub model: &'a str,
    pub body: Bytes,
}

/// Sends a request to the best node that takes it and relays the response.
pub async fn forward(state: &RouterState, request: Forward<'_>) -> Response {
    let candidates = state.candidates(request.model);
    let mut saw_no_capacity = false;
    // The id a node bills under. After a node answers "retry elsewhere" it holds
    // nothing for the request, so the next node gets a derived id (a reused id
    // would meet the released hold). After a connection failure the outcome on
    // that node is unknown, so the id stays: if that node did hold or charge,
    // the next one refuses the duplicate instead of billing twice.
    let mut billing_id = request.request_id.to_string();
    let mut retries_elsewhere = 0;

    for node in candidates.into_iter().take(MAX_NODES_TRIED) {
        let url = format!("{}{}", node.base_url, internal::CHAT_COMPLETIONS_PATH);
        let sent = state
            .http
            .post(&url)
            .timeout(state.config.node_timeout)
            .header(header::CONTENT_TYPE, "application/json")
            .header(internal::CLUSTER_TOKEN, &state.config.cluster_token)
            .header(internal::REQUEST_ID, billing_id.as_str())
            .header(internal::ACCOUNT_ID, request.account_id.as_str())
            .header(internal::KEY_PREFIX, request.key_prefix)
            .header(internal::API_KIND, request.api_kind.as_str())
            .header(internal::MODEL, request.model)
            .body(request.body.clone())
            .send()
            .await;

        let response = match sent {
            Ok(response) => response,
            Err(error) => {
                warn!(node.id = %node.id, error = %error, "coordinator node unreachable; trying the next one");
                state.node_failovers.increment(&[("reason", "unreachable")]);
                continue;
            }
        };
        if response.status() == StatusCode::SERVICE_UNAVAILABLE
            && response.headers().contains_key(internal::RETRY_ELSEWHERE)
        {
            debug!(node.id = %node.id, "node has no provider for the model; trying the next one");
            state.node_failovers.increment(&[("reason", "no_provider")]);
            saw_no_capacity = true;
            retries_elsewhere += 1;
            billing_id = format!("{}.{retries_elsewhere}", request.request_id);
            continue;
        }

        return relay(response, state.track_stream());
    }

    let message = if saw_no_capacity {
        "no provider is serving this model right now"
    } else {
        "no coordinator node is reachable"
    };
    ApiError::new(ErrorKind::NoCapacity, message)
        .with_retry_after(5)
        .into_response()
}

/// Streams a node's response to the consumer, keeping the headers that matter.
fn relay(response: reqwest::Response, stream_guard: crate::state::ActiveStream) -> Response {
    let status = response.status();
    let mut headers = axum::http::HeaderMap::new();
    for name in [
        header::CONTENT_TYPE,
        header::CACHE_CONTROL,
        header::RETRY_AFTER,
    ] {
        if let Some(value) = response.headers().get(&name) {
            headers.insert(name, value.clone());
        }
    }
    if headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"))
    {
        // Tell reverse proxies in front of the router not to buffer the stream.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    }

    // The guard lives as long as the body, so shutdown can wait for the stream.
    let body = response.bytes_stream().map(move |chunk| {
        let _streaming = &stream_guard;
        chunk
    });
    let mut relayed = Response::new(Body::from_stream(body));
    *relayed.status_mut() = status;
    *relayed.headers_mut() = headers;
    relayed
}
