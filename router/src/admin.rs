//! Operator endpoints under `/admin/v1`, behind the admin token
//! (`Authorization: Bearer TOKEN`, compared in constant time). Without a
//! configured token every admin route returns 404, as if it did not exist.
//!
//! Keys and tokens created here are returned once and stored only as hashes.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use switchyard_shared::api::{ApiError, ErrorKind};
use switchyard_shared::catalog::{CatalogError, ModelEntry, validate_entry};
use switchyard_shared::ids::AccountId;
use switchyard_shared::ids::ModelId;
use switchyard_shared::ledger::LedgerError;
use switchyard_shared::ledger::{RateLimits, sync_catalog};
use switchyard_shared::money::MicroUsd;
use tracing::{info, warn};

use crate::state::RouterState;

pub fn routes() -> Router<Arc<RouterState>> {
    Router::new()
        .route("/admin/v1/accounts", post(create_account))
        .route("/admin/v1/accounts/{id}/credits", post(credit))
        .route("/admin/v1/accounts/{id}/keys", post(issue_key))
        .route(
            "/admin/v1/accounts/{id}/provider-tokens",
            post(issue_provider_token),
        )
        .route("/admin/v1/keys/{prefix}", delete(revoke_key))
        .route("/admin/v1/accounts/{id}/limits", put(set_limits))
        .route("/admin/v1/models/{*id}", put(set_model))
}

fn authorize(state: &RouterState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.config.admin_token else {
        return Err(ApiError::new(ErrorKind::NotFound, "no such route"));
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default();
    if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::new(
            ErrorKind::Unauthenticated,
            "missing or invalid admin token",
        ))
    }
}

fn ledger_error(error: LedgerError) -> ApiError {
    match error {
        LedgerError::AccountNotFound(account) => ApiError::new(
            ErrorKind::NotFound,
            format!("account `{account}` not found"),
        ),
        LedgerError::KeyNotFound(prefix) => ApiError::new(
            ErrorKind::NotFound,
            format!("no active API key with prefix `{prefix}`"),
        ),
        LedgerError::InvalidAmount(amount) => ApiError::invalid_field(
            "amount_usd",
            format!("amount {amount} USD must not be negative"),
        ),
        _ => ApiError::new(
            ErrorKind::Unavailable,
            "the ledger is unavailable; try again later",
        )
        .with_retry_after(5),
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| {
        ApiError::new(
            ErrorKind::InvalidRequest,
            format!("invalid request body: {error}"),
        )
    })
}

fn valid_account_id(id: &str) -> Result<AccountId, ApiError> {
    let valid = !id.is_empty()
        && id.len() <= 128
        && id
            .chars()
            .all(|character| character.is_ascii_alphanumeric() || "-_.@".contains(character));
    if valid {
        Ok(AccountId::new(id))
    } else {
        Err(ApiError::invalid_field(
            "id",
            "`id` must be 1 to 128 characters of letters, digits, `-`, `_`, `.` or `@`",
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateAccount {
    id: String,
}

async fn create_account(
    State(state): State<Arc<RouterState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let request: CreateAccount = parse_body(&body)?;
    let account = valid_account_id(&request.id)?;

    state
        .ledger
        .create_account(&account)
        .await
        .map_err(ledger_error)?;
    info!(account.id = %account, "account created");
    Ok((StatusCode::CREATED, Json(json!({"id": account}))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credit {
    /// Decimal US dollars as a string, such as `"12.50"`, so no precision is lost
    /// to floating point.
    amount_usd: Value,
    /// Makes the credit idempotent: a second credit with the same reference is
    /// ignored.
    reference: String,
}

async fn credit(
    State(state): State<Arc<RouterState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let request: Credit = parse_body(&body)?;
    let Value::String(amount_text) = &request.amount_usd else {
        return Err(ApiError::invalid_field(
            "amount_usd",
            "`amount_usd` must be a string such as \"12.50\"",
        ));
    };
    let amount = MicroUsd::parse_usd(amount_text)
        .map_err(|error| ApiError::invalid_field("amount_usd", format!("`amount_usd` {error}")))?;
    if amount == MicroUsd::ZERO {
        return Err(ApiError::invalid_field(
            "amount_usd",
            "`amount_usd` must be more than zero",
        ));
    }
    if request.reference.trim().is_empty() {
        return Err(ApiError::invalid_field(
            "reference",
            "`reference` must not be empty",
        ));
    }

    let account = AccountId::new(id);
    let balance = state
        .ledger
        .credit(&account, amount, &format!("admin:{}", request.reference))
        .await
        .map_err(ledger_error)?;
    info!(account.id = %account, amount_micro_usd = amount.get(), "account credited");
    Ok(Json(json!({
        "id": account,
        "balance_micro_usd": balance.balance.get(),
        "available_micro_usd": balance.available().get(),
    })))
}

#[derive(Deserialize, Default)]
struct IssueKey {
    #[serde(default)]
    name: String,
}

async fn issue_key(
    State(state): State<Arc<RouterState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let request: IssueKey = if body.is_empty() {
        IssueKey::default()
    } else {
        parse_body(&body)?
    };

    let account = AccountId::new(id);
    let issued = state
        .ledger
        .issue_api_key(&account, &request.name)
        .await
        .map_err(ledger_error)?;
    info!(account.id = %account, key.prefix = %issued.display_prefix, "API key issued");
    Ok((
        StatusCode::CREATED,
        Json(json!({"key": issued.secret, "display_prefix": issued.display_prefix})),
    )
        .into_response())
}

async fn issue_provider_token(
    State(state): State<Arc<RouterState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let account = AccountId::new(id);
    let issued = state
        .ledger
        .issue_provider_token(&account)
        .await
        .map_err(ledger_error)?;
    info!(account.id = %account, token.prefix = %issued.display_prefix, "provider token issued");
    Ok((
        StatusCode::CREATED,
        Json(json!({"token": issued.secret, "display_prefix": issued.display_prefix})),
    )
        .into_response())
}

/// Changes to one model. A field left out keeps its current value; a new model
/// needs both prices, and its other fields start at the catalog defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetModel {
    input_per_mtok: Option<i64>,
    output_per_mtok: Option<i64>,
    min_charge: Option<i64>,
    default_max_tokens: Option<u32>,
    replicas: Option<u32>,
    enabled: Option<bool>,
    /// An empty string clears the expected weight hash.
    weight_hash: Option<String>,
}

fn valid_model_id(id: &str) -> Result<ModelId, ApiError> {
    let valid = !id.is_empty()
        && id.len() <= 256
        && id
            .chars()
            .all(|character| character.is_ascii_graphic() && character != '"' && character != '\\');
    if valid {
        Ok(ModelId::new(id))
    } else {
        Err(ApiError::invalid_field(
            "id",
            "the model id must be 1 to 256 printable ASCII characters without spaces or quotes",
        ))
    }
}

/// `PUT /admin/v1/models/{id}`: creates a model or changes the given fields of
/// an existing one. This router uses the result at once; other roles within
/// their refresh interval.
async fn set_model(
    State(state): State<Arc<RouterState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let id = valid_model_id(&id)?;
    let changes: SetModel = parse_body(&body)?;

    let existing = state
        .ledger
        .list_models()
        .await
        .map_err(ledger_error)?
        .into_iter()
        .find(|model| model.id == id);
    let mut entry = match existing {
        Some(entry) => entry,
        None => {
            let (Some(input_per_mtok), Some(output_per_mtok)) =
                (changes.input_per_mtok, changes.output_per_mtok)
            else {
                return Err(ApiError::invalid_field(
                    "input_per_mtok",
                    "a new model needs `input_per_mtok` and `output_per_mtok`",
                ));
            };
            ModelEntry {
                id,
                input_per_mtok,
                output_per_mtok,
                min_charge: 0,
                default_max_tokens: 8192,
                replicas: 1,
                enabled: true,
                weight_hash: None,
            }
        }
    };
    if let Some(value) = changes.input_per_mtok {
        entry.input_per_mtok = value;
    }
    if let Some(value) = changes.output_per_mtok {
        entry.output_per_mtok = value;
    }
    if let Some(value) = changes.min_charge {
        entry.min_charge = value;
    }
    if let Some(value) = changes.default_max_tokens {
        entry.default_max_tokens = value;
    }
    if let Some(value) = changes.replicas {
        entry.replicas = value;
    }
    if let Some(value) = changes.enabled {
        entry.enabled = value;
    }
    if let Some(value) = changes.weight_hash {
        entry.weight_hash = (!value.is_empty()).then_some(value);
    }
    validate_entry(&entry).map_err(|error| match error {
        CatalogError::InvalidModel { field, reason, .. } => {
            ApiError::invalid_field(field, format!("`{field}` {reason}"))
        }
        other => ApiError::new(ErrorKind::InvalidRequest, other.to_string()),
    })?;

    state
        .ledger
        .upsert_model(&entry)
        .await
        .map_err(ledger_error)?;
    let seed = state.catalog.snapshot();
    if let Err(error) = sync_catalog(state.ledger.as_ref(), &seed, &state.catalog).await {
        warn!(error = %error, "failed to reload the catalog after a model change");
    }
    info!(model = %entry.id, "model settings changed");
    Ok(Json(serde_json::to_value(&entry).unwrap_or_default()))
}

/// New rate limits of an account; `null` (or absent) means the router default,
/// zero means no limit.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetLimits {
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
}

/// `PUT /admin/v1/accounts/{id}/limits`.
async fn set_limits(
    State(state): State<Arc<RouterState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let request: SetLimits = parse_body(&body)?;
    let limits = RateLimits {
        requests_per_minute: request.requests_per_minute,
        tokens_per_minute: request.tokens_per_minute,
    };
    let account = AccountId::new(id);
    state
        .ledger
        .set_rate_limits(&account, limits)
        .await
        .map_err(ledger_error)?;
    info!(account.id = %account, "rate limits set");
    Ok(Json(json!({"id": account, "limits": limits})))
}

async fn revoke_key(
    State(state): State<Arc<RouterState>>,
    Path(prefix): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    authorize(&state, &headers)?;
    let hash = state
        .ledger
        .revoke_api_key(&prefix)
        .await
        .map_err(ledger_error)?;
    state.keys.forget(hash);
    crate::revocation::publish(&state, hash).await;
    info!(key.prefix = %prefix, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}
