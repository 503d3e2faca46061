//! API key authentication with a bounded, time-limited cache of lookups.
//!
//! Keys arrive as `Authorization: Bearer KEY` or, as Anthropic's SDKs send them,
//! `x-api-key: KEY`. Only the SHA-256 of a key is looked up or cached.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, header};
use switchyard_shared::api::{ApiError, ErrorKind};
use switchyard_shared::ledger::{ApiKeyInfo, Ledger, SecretHash};
use tracing::warn;

/// Recent key lookups, unknown keys included so a flood of bad keys does not
/// reach the ledger. Entries expire after the TTL; when full, the cache is cleared.
pub struct KeyCache {
    entries: Mutex<HashMap<SecretHash, (Option<ApiKeyInfo>, Instant)>>,
    ttl: Duration,
    capacity: usize,
}

impl KeyCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            ttl,
            capacity,
        }
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<SecretHash, (Option<ApiKeyInfo>, Instant)>> {
        // Single inserts and reads only: a poisoned map is still consistent.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Resolves a presented key, from the cache when the entry is fresh.
    pub async fn authenticate(
        &self,
        ledger: &dyn Ledger,
        key: &str,
    ) -> Result<ApiKeyInfo, ApiError> {
        let hash = SecretHash::of(key);
        let cached = self
            .lock()
            .get(&hash)
            .filter(|(_, stored)| stored.elapsed() < self.ttl)
            .map(|(info, _)| info.clone());

        let info = match cached {
            Some(info) => info,
            None => {
                let info = ledger.authenticate(hash).await.map_err(|error| {
                    warn!(error = %error, "API key lookup failed");
                    ApiError::new(
                        ErrorKind::Unavailable,
                        "authentication is unavailable; try again later",
                    )
                    .with_retry_after(5)
                })?;
                let mut entries = self.lock();
                if entries.len() >= self.capacity {
                    entries.clear();
                }
                entries.insert(hash, (info.clone(), Instant::now()));
                info
            }
        };

        info.ok_or_else(|| ApiError::new(ErrorKind::Unauthenticated, "invalid API key"))
    }

    /// Drops a cached key so its next use is looked up again (after revocation).
    pub fn forget(&self, key_hash: SecretHash) {
        self.lock().remove(&key_hash);
    }
}

/// Extracts the presented key from `Authorization: Bearer` or `x-api-key`.
pub fn presented_key(headers: &HeaderMap) -> Result<&str, ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            value
                .strip_prefix("Bearer ")
                .or_else(|| value.strip_prefix("bearer "))
        })
        .map(str::trim);
    let api_key = headers
        .get("x-api-key")
        .and_then(|value| value.to_str().ok())
        .map(str::trim);

    bearer
        .or(api_key)
        .filter(|key| !key.is_empty())
        .ok_or_else(|| {
            ApiError::new(
                ErrorKind::Unauthenticated,
                "missing API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`",
            )
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::http::HeaderValue;
    use switchyard_shared::ids::AccountId;
    use switchyard_shared::ledger::MemoryLedger;

    use super::*;

    #[test]
    fn key_from_bearer_or_x_api_key() {
        let mut headers = HeaderMap::new();
        assert!(presented_key(&headers).is_err());

        headers.insert("x-api-key", HeaderValue::from_static("sy_anthropic"));
        assert_eq!(presented_key(&headers).unwrap(), "sy_anthropic");

        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer sy_openai"),
        );
        assert_eq!(presented_key(&headers).unwrap(), "sy_openai");
    }

    #[tokio::test]
    async fn cache_resolves_and_rejects_keys() {
        let ledger = Arc::new(MemoryLedger::new());
        let account = AccountId::from("acct");
        ledger.create_account(&account).await.unwrap();
        let key = ledger.issue_api_key(&account, "test").await.unwrap().secret;
        let cache = KeyCache::new(Duration::from_secs(60), 10);

        let info = cache.authenticate(ledger.as_ref(), &key).await.unwrap();
        assert_eq!(info.account_id, account);
        let error = cache
            .authenticate(ledger.as_ref(), "sy_wrong")
            .await
            .unwrap_err();
        assert_eq!(error.kind, ErrorKind::Unauthenticated);
    }
}
