//! The node's internal HTTP surface: forwarded consumer requests, provider
//! sessions piped through routers, and health endpoints.
//!
//! Every internal route except the health checks requires the cluster token.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::json;
use subtle::ConstantTimeEq;
use switchyard_shared::api::{ApiError, ErrorKind};
use switchyard_shared::ids::{AccountId, ConsumerRequestId};
use switchyard_shared::internal;
use switchyard_shared::ledger::{HoldRequest, LedgerError};
use switchyard_shared::protocol::MAX_MESSAGE_BYTES;
use tokio::sync::oneshot;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use crate::dispatch::{self, Job, Start};
use crate::node::NodeState;
use crate::request;

/// Builds the node's router.
pub fn app(state: Arc<NodeState>) -> Router {
    let body_limit = state.config.max_body_bytes;
    let http_metrics = state.metrics.http.clone();
    Router::new()
        .route("/metrics", get(metrics))
        .route(internal::CHAT_COMPLETIONS_PATH, post(chat_completions))
        .route(internal::PROVIDER_SESSION_PATH, get(provider_session))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            http_metrics,
            switchyard_shared::metrics::track_http,
        ))
        .with_state(state)
}

/// Prometheus metrics of this node, with per-model capacity computed now.
async fn metrics(State(state): State<Arc<NodeState>>) -> Response {
    use switchyard_shared::metrics::{render_counter, render_gauge};

    let mut out = String::new();
    state.metrics.http.render(&mut out, "switchyard_node");
    render_counter(
        &mut out,
        &state.metrics.requests,
        "switchyard_node_requests_total",
        "Consumer requests by how they ended.",
    );
    render_counter(
        &mut out,
        &state.metrics.attempt_failures,
        "switchyard_node_attempt_failures_total",
        "Dispatch attempts that failed before the first content chunk, by reason.",
    );
    render_counter(
        &mut out,
        &state.metrics.redis_errors,
        "switchyard_node_redis_errors_total",
        "Failed calls to the cluster bus.",
    );
    render_counter(
        &mut out,
        &state.metrics.rehomes,
        "switchyard_node_rehomes_total",
        "Provider sockets closed so the provider moves to its new home.",
    );
    render_counter(
        &mut out,
        &state.metrics.ledger_errors,
        "switchyard_node_ledger_errors_total",
        "Failed ledger calls, by operation.",
    );

    let capacity = state.scheduler.model_capacity();
    let per_model = |value: fn(&crate::scheduler::ModelCapacity) -> usize| -> Vec<(Vec<(&'static str, String)>, f64)> {
        capacity
            .iter()
            .map(|model| (vec![("model", model.model.to_string())], value(model) as f64))
            .collect()
    };
    render_gauge(
        &mut out,
        "switchyard_node_providers",
        "Providers serving each model on this node.",
        &per_model(|model| model.providers),
    );
    render_gauge(
        &mut out,
        "switchyard_node_free_slots",
        "Free concurrency slots per model.",
        &per_model(|model| model.free_slots),
    );
    render_gauge(
        &mut out,
        "switchyard_node_queue_depth",
        "Requests waiting for a slot per model.",
        &per_model(|model| model.queue_depth),
    );
    render_gauge(
        &mut out,
        "switchyard_node_provider_sessions",
        "Provider WebSocket sessions on this node.",
        &[(Vec::new(), state.provider_count() as f64)],
    );
    (
        [(
            header::CONTENT_TYPE,
            switchyard_shared::metrics::CONTENT_TYPE,
        )],
        out,
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready when not shutting down and the ledger answers within a second.
async fn readyz(State(state): State<Arc<NodeState>>) -> Response {
    if state.shutdown.is_cancelled() || state.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response();
    }
    let ledger =
        tokio::time::timeout(std::time::Duration::from_secs(1), state.ledger.check()).await;
    if !matches!(ledger, Ok(Ok(()))) {
        return (StatusCode::SERVICE_UNAVAILABLE, "ledger unavailable").into_response();
    }
    Json(json!({
        "node_id": state.config.node_id,
        "providers": state.provider_count(),
    }))
    .into_response()
}

fn authorized(state: &NodeState, headers: &HeaderMap) -> bool {
    let presented = headers
        .get(internal::CLUSTER_TOKEN)
        .map(HeaderValue::as_bytes)
        .unwrap_or_default();
    presented
        .ct_eq(state.config.cluster_token.as_bytes())
        .into()
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .filter(|value| !value.is_empty())
}

async fn provider_session(
    State(state): State<Arc<NodeState>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if !authorized(&state, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    upgrade
        .max_message_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| async move {
            let (sink, stream) = socket.split();
            crate::session::run_session(state, sink, stream).await;
        })
}

/// Takes a forwarded chat completion request and responds in OpenAI format.
async fn chat_completions(
    State(state): State<Arc<NodeState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&state, &headers) {
        return ApiError::new(
            ErrorKind::Unauthenticated,
            "missing or invalid cluster token",
        )
        .into_response();
    }
    let (Some(request_id), Some(account_id)) = (
        header_str(&headers, internal::REQUEST_ID),
        header_str(&headers, internal::ACCOUNT_ID),
    ) else {
        return ApiError::new(
            ErrorKind::InvalidRequest,
            "missing internal request envelope",
        )
        .into_response();
    };

    let key_prefix = header_str(&headers, internal::KEY_PREFIX)
        .unwrap_or_default()
        .to_owned();
    let span = info_span!("request", request.id = %request_id, account.id = %account_id, model = tracing::field::Empty);
    let request_id = ConsumerRequestId::from(request_id);
    let account_id = AccountId::from(account_id);
    match handle_chat(state, request_id, account_id, key_prefix, body)
        .instrument(span)
        .await
    {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn handle_chat(
    state: Arc<NodeState>,
    request_id: ConsumerRequestId,
    account_id: AccountId,
    key_prefix: String,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = request::parse_chat_request(&body)?;
    let model = request::model_field(&body)?;
    let entry = state.catalog.get(model).ok_or_else(|| {
        ApiError::new(
            ErrorKind::ModelNotFound,
            format!("model `{model}` does not exist"),
        )
    })?;
    tracing::Span::current().record("model", entry.id.as_str());
    let chat = request::validate_chat_request(body, &entry)?;

    if state.is_draining() || !state.scheduler.has_routable(&entry.id) {
        return Ok(retry_elsewhere());
    }

    let hold = entry
        .prices()
        .cost(chat.prompt_limit, chat.completion_limit());
    let placed = state
        .ledger
        .place_hold(HoldRequest {
            request_id: request_id.clone(),
            account_id: account_id.clone(),
            key_prefix,
            amount: hold,
            node_id: state.config.node_id.clone(),
        })
        .await;
    match placed {
        Ok(()) => {}
        Err(LedgerError::InsufficientFunds {
            available,
            requested,
        }) => {
            return Err(ApiError::new(
                ErrorKind::InsufficientFunds,
                format!(
                    "this request needs a hold of {requested} USD but the available balance is {available} USD; lower max_tokens or add credit"
                ),
            ));
        }
        Err(LedgerError::DuplicateHold(_)) => {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                "a request with this id is already running",
            ));
        }
        Err(error) => {
            state
                .metrics
                .ledger_errors
                .increment(&[("operation", "hold")]);
            warn!(error = %error, "failed to place a hold");
            return Err(ApiError::new(
                ErrorKind::Unavailable,
                "billing is unavailable; try again later",
            )
            .with_retry_after(5));
        }
    }

    let active = state.track_request();
    let consumer_gone = CancellationToken::new();
    let stream = chat.stream;
    let job = Job {
        node: state.clone(),
        request_id,
        account_id,
        entry,
        request: chat,
        hold,
        consumer_gone: consumer_gone.clone(),
    };
    let (start_sender, start_receiver) = oneshot::channel();
    state.tasks.spawn(
        async move {
            let _active = active;
            dispatch::run(job, start_sender).await;
        }
        .instrument(tracing::Span::current()),
    );

    // If this handler is dropped before the answer starts, the consumer has gone.
    let gone_on_drop = consumer_gone.clone().drop_guard();
    let start = start_receiver
        .await
        .map_err(|_| ApiError::new(ErrorKind::Internal, "the request ended without a response"))?;
    let response = match start {
        Start::Failed {
            error,
            retry_elsewhere: true,
        } => {
            let mut response = error.into_response();
            response
                .headers_mut()
                .insert(internal::RETRY_ELSEWHERE, HeaderValue::from_static("true"));
            response
        }
        Start::Failed { error, .. } => error.into_response(),
        Start::Json(value) => {
            gone_on_drop.disarm();
            Json(value).into_response()
        }
        Start::Stream(receiver) => {
            // The guard moves into the body: dropping the body (the consumer left)
            // cancels the request.
            let events = ReceiverStream::new(receiver).map(move |event| {
                let _keep_alive = &gone_on_drop;
                Ok::<_, std::convert::Infallible>(event)
            });
            debug_assert!(stream);
            sse_response(Body::from_stream(events))
        }
    };
    Ok(response)
}

fn sse_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn retry_elsewhere() -> Response {
    let mut response = ApiError::new(ErrorKind::NoCapacity, "no provider is serving this model")
        .with_retry_after(5)
        .into_response();
    response
        .headers_mut()
        .insert(internal::RETRY_ELSEWHERE, HeaderValue::from_static("true"));
    response
}
