//! The consumer-facing HTTP surface of a router.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use switchyard_shared::api::{ApiError, ErrorKind};
use switchyard_shared::ids::ConsumerRequestId;
use switchyard_shared::internal::ApiKind;
use switchyard_shared::protocol::MAX_MESSAGE_BYTES;
use tracing::{Instrument, info_span};

use crate::auth::presented_key;
use crate::proxy::{self, Forward};
use crate::state::RouterState;

/// Builds the router's HTTP app.
pub fn app(state: Arc<RouterState>) -> Router {
    let http_metrics = state.http_metrics.clone();
    Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/v1/account", get(crate::account::account))
        .route("/v1/account/usage", get(crate::account::usage))
        .merge(crate::admin::routes())
        .route("/ws/provider", get(provider_socket))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        // Bodies are read with their own limit so the 413 is in the API's format.
        .layer(DefaultBodyLimit::disable())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(
            http_metrics,
            switchyard_shared::metrics::track_http,
        ))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok"
}

/// Ready when not shutting down and the ledger answers within a second.
async fn readyz(State(state): State<Arc<RouterState>>) -> Response {
    if state.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let ledger =
        tokio::time::timeout(std::time::Duration::from_secs(1), state.ledger.check()).await;
    if !matches!(ledger, Ok(Ok(()))) {
        return (StatusCode::SERVICE_UNAVAILABLE, "ledger unavailable").into_response();
    }
    "ready".into_response()
}

/// Prometheus metrics of this router.
async fn metrics(State(state): State<Arc<RouterState>>) -> Response {
    use switchyard_shared::metrics::{render_counter, render_gauge};

    let mut out = String::new();
    state.http_metrics.render(&mut out, "switchyard_router");
    render_counter(
        &mut out,
        &state.node_failovers,
        "switchyard_router_node_failovers_total",
        "Requests moved to the next node, by reason.",
    );
    render_counter(
        &mut out,
        &state.limiter.rejections,
        "switchyard_router_rate_limit_rejections_total",
        "Requests refused by a rate limit, by limit.",
    );
    render_counter(
        &mut out,
        &state.limiter.fallbacks,
        "switchyard_router_rate_limit_fallbacks_total",
        "Rate-limit checks made locally because Redis was unreachable.",
    );
    render_counter(
        &mut out,
        &state.redis_errors,
        "switchyard_router_redis_errors_total",
        "Failed Redis calls of the cluster view, by operation.",
    );
    render_gauge(
        &mut out,
        "switchyard_router_nodes",
        "Coordinator nodes this router routes to.",
        &[(Vec::new(), state.nodes.len() as f64)],
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            switchyard_shared::metrics::CONTENT_TYPE,
        )],
        out,
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(ErrorKind::NotFound, "no such route")
}

async fn method_not_allowed() -> Response {
    let mut response = ApiError::new(
        ErrorKind::InvalidRequest,
        "method not allowed on this route",
    )
    .into_response();
    *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    response
}

async fn provider_socket(
    State(state): State<Arc<RouterState>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    upgrade
        .max_message_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| crate::ws_proxy::pipe_provider(state, socket))
}

async fn list_models(
    State(state): State<Arc<RouterState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let key = presented_key(&headers)?;
    state.keys.authenticate(state.ledger.as_ref(), key).await?;

    let data: Vec<Value> = state
        .catalog
        .snapshot()
        .enabled()
        .map(|entry| {
            json!({
                "id": entry.id,
                "object": "model",
                "created": 0,
                "owned_by": "switchyard",
            })
        })
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn chat_completions(
    State(state): State<Arc<RouterState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let request_id = ConsumerRequestId::generate();
    let span = info_span!("request", request.id = %request_id, account.id = tracing::field::Empty, model = tracing::field::Empty);
    let result = async {
        let key = presented_key(&headers)?;
        let account = state.keys.authenticate(state.ledger.as_ref(), key).await?;
        tracing::Span::current().record("account.id", account.account_id.as_str());

        require_json(&headers)?;
        let body = read_body(body, state.config.max_body_bytes).await?;
        let fields = routing_fields(&body)?;
        let model = fields.model;
        let Some(entry) = state.catalog.get(&model) else {
            return Err(ApiError::new(
                ErrorKind::ModelNotFound,
                format!("model `{model}` does not exist"),
            ));
        };
        tracing::Span::current().record("model", model.as_str());

        // Tokens are estimated before the answer exists: a quarter of the body's
        // bytes for the prompt and the completion limit for the answer.
        let completion_limit = fields
            .max_tokens
            .unwrap_or(u64::from(entry.default_max_tokens))
            .saturating_mul(fields.choices.unwrap_or(1).max(1));
        let estimated_tokens = (body.len() as u64)
            .div_ceil(4)
            .saturating_add(completion_limit);
        let admission = state
            .limiter
            .admit(&account.account_id, account.limits, estimated_tokens)
            .await?;

        let forward = Forward {
            request_id: &request_id,
            account_id: &account.account_id,
            key_prefix: &account.display_prefix,
            api_kind: ApiKind::ChatCompletions,
            model: &model,
            body,
        };
        let mut response = proxy::forward(&state, forward).await;
        admission.apply(response.headers_mut());
        Ok(response)
    }
    .instrument(span)
    .await;

    result.unwrap_or_else(IntoResponse::into_response)
}

/// Rejects bodies declared as anything but JSON. A missing content type is read as
/// JSON, since some clients omit it.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(content_type) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = content_type
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorKind::UnsupportedMediaType,
        format!("content type `{essence}` is not supported; send application/json"),
    ))
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorKind::PayloadTooLarge,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    };
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(bytes),
        Err(error) => {
            let over_limit = std::error::Error::source(&error)
                .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
            if over_limit {
                Err(too_large())
            } else {
                Err(ApiError::new(
                    ErrorKind::InvalidRequest,
                    "failed to read the request body",
                ))
            }
        }
    }
}

/// The fields a router reads from a request body.
#[derive(Debug)]
struct RoutingFields {
    model: String,
    /// `max_completion_tokens`, else `max_tokens`, when a positive integer.
    max_tokens: Option<u64>,
    /// `n`, when a positive integer.
    choices: Option<u64>,
}

/// Reads the fields the router needs from a JSON body; the node validates the
/// rest, so other values here are only used when well-formed.
fn routing_fields(body: &[u8]) -> Result<RoutingFields, ApiError> {
    #[derive(serde::Deserialize)]
    struct Fields {
        model: Option<Value>,
        max_tokens: Option<Value>,
        max_completion_tokens: Option<Value>,
        n: Option<Value>,
    }

    let parsed: Fields = serde_json::from_slice(body).map_err(|error| {
        let message = match error.classify() {
            // Valid JSON of the wrong shape, such as an array.
            serde_json::error::Category::Data => "request body must be a JSON object".to_owned(),
            _ => format!("request body is not valid JSON: {error}"),
        };
        ApiError::new(ErrorKind::InvalidJson, message)
    })?;
    let positive = |value: &Option<Value>| {
        value
            .as_ref()
            .and_then(Value::as_u64)
            .filter(|number| *number > 0)
    };
    let max_tokens =
        positive(&parsed.max_completion_tokens).or_else(|| positive(&parsed.max_tokens));
    let choices = positive(&parsed.n);
    let model = match parsed.model {
        Some(Value::String(model)) if !model.is_empty() => model,
        Some(Value::String(_)) => {
            return Err(ApiError::invalid_field(
                "model",
                "`model` must not be empty",
            ));
        }
        Some(Value::Null) | None => {
            return Err(ApiError::invalid_field(
                "model",
                "missing required field `model`",
            ));
        }
        Some(_) => return Err(ApiError::invalid_field("model", "`model` must be a string")),
    };
    Ok(RoutingFields {
        model,
        max_tokens,
        choices,
    })
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn json_content_types_are_accepted() {
        let mut headers = HeaderMap::new();
        assert!(require_json(&headers).is_ok());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(require_json(&headers).is_ok());
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert_eq!(
            require_json(&headers).unwrap_err().kind,
            ErrorKind::UnsupportedMediaType
        );
    }

    #[test]
    fn routing_fields_name_the_field() {
        assert_eq!(routing_fields(br#"{"model":"m"}"#).unwrap().model, "m");
        assert_eq!(
            routing_fields(br#"{"model":""}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("model")
        );
        assert_eq!(
            routing_fields(br#"{"messages":[]}"#)
                .unwrap_err()
                .param
                .as_deref(),
            Some("model")
        );
        assert_eq!(
            routing_fields(b"{").unwrap_err().kind,
            ErrorKind::InvalidJson
        );
    }
}
