//! Consumer account endpoints: balance and usage history.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_shared::api::{ApiError, ErrorKind};
use switchyard_shared::ledger::LedgerError;

use crate::auth::presented_key;
use crate::state::RouterState;

/// Largest page of usage records.
const MAX_PAGE: u32 = 500;

fn ledger_error(error: LedgerError) -> ApiError {
    match error {
        LedgerError::AccountNotFound(_) => ApiError::new(ErrorKind::NotFound, "account not found"),
        _ => ApiError::new(
            ErrorKind::Unavailable,
            "the ledger is unavailable; try again later",
        )
        .with_retry_after(5),
    }
}

/// `GET /v1/account`: the caller's balance and open holds.
pub async fn account(
    State(state): State<Arc<RouterState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let key = presented_key(&headers)?;
    let info = state.keys.authenticate(state.ledger.as_ref(), key).await?;
    let balance = state
        .ledger
        .balance(&info.account_id)
        .await
        .map_err(ledger_error)?;

    Ok(Json(json!({
        "object": "account",
        "id": info.account_id,
        "balance_micro_usd": balance.balance.get(),
        "held_micro_usd": balance.held.get(),
        "available_micro_usd": balance.available().get(),
        "balance_usd": balance.balance.to_string(),
        "available_usd": balance.available().to_string(),
    })))
}

#[derive(Deserialize)]
pub struct UsageQuery {
    limit: Option<u32>,
    before: Option<i64>,
}

/// `GET /v1/account/usage?limit=N&before=SEQUENCE`: settled requests, newest first.
pub async fn usage(
    State(state): State<Arc<RouterState>>,
    headers: HeaderMap,
    query: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let key = presented_key(&headers)?;
    let info = state.keys.authenticate(state.ledger.as_ref(), key).await?;
    let Query(query) = query.map_err(|_| {
        ApiError::new(
            ErrorKind::InvalidRequest,
            "invalid query: `limit` and `before` must be non-negative integers",
        )
    })?;
    let limit = query.limit.unwrap_or(50);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::invalid_field(
            "limit",
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        ));
    }

    let records = state
        .ledger
        .usage(&info.account_id, limit, query.before)
        .await
        .map_err(ledger_error)?;
    let next_before = (records.len() == limit as usize)
        .then(|| records.last().map(|record| record.sequence))
        .flatten();

    Ok(Json(json!({
        "object": "list",
        "data": records,
        "next_before": next_before,
    })))
}
