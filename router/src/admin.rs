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
use switchyard_shared::ledger::sync_catalog;
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
struct Credit {
    /// Decimal US dollars, such as `"12.50"`.
    amount_usd: String,
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
    let amount = MicroUsd::parse_usd(&request.amount_usd)
        .map_err(|error| ApiError::invalid_field("amount_usd", format!("`amount_usd` {error}")))?;
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

/// Prices and placement of one model; absent fields keep their defaults.
#[derive(Deserialize)]
struct SetModel {
    input_per_mtok: i64,
    output_per_mtok: i64,
    #[serde(default)]
    min_charge: i64,
    #[serde(default = "default_max_tokens")]
    default_max_tokens: u32,
    #[serde(default = "one")]
    replicas: u32,
    #[serde(default = "enabled")]
    enabled: bool,
    #[serde(default)]
    weight_hash: Option<String>,
}

fn default_max_tokens() -> u32 {
    8192
}

fn one() -> u32 {
    1
}

fn enabled() -> bool {
    true
}

/// `PUT /admin/v1/models/{id}`: creates or replaces a model in the ledger's
/// catalog. This router uses it at once; other roles within their refresh
/// interval.
async fn set_model(
    State(state): State<Arc<RouterState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    authorize(&state, &headers)?;
    let request: SetModel = parse_body(&body)?;
    let entry = ModelEntry {
        id: ModelId::new(id),
        input_per_mtok: request.input_per_mtok,
        output_per_mtok: request.output_per_mtok,
        min_charge: request.min_charge,
        default_max_tokens: request.default_max_tokens,
        replicas: request.replicas,
        enabled: request.enabled,
        weight_hash: request.weight_hash,
    };
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
    info!(model = %entry.id, "model prices set");
    Ok(Json(serde_json::to_value(&entry).unwrap_or_default()))
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
    // NOTE: only this router's cache forgets the key at once; other routers
    // notice when their cached entry expires.
    state.keys.forget(hash);
    info!(key.prefix = %prefix, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}
