//! Broadcast of revoked API keys between routers over Redis pub/sub, so a
//! revoked key stops working on every router at once rather than when each
//! router's cache entry expires.
//!
//! Messages carry the key's SHA-256 in hex, never the key. A router that is
//! disconnected from Redis misses the messages sent meanwhile; its cache entries
//! still expire after the cache TTL, which bounds how long a missed revocation
//! lasts.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use redis::AsyncCommands;
use switchyard_shared::ledger::SecretHash;
use tracing::{debug, info, warn};

use crate::state::RouterState;

fn channel(key_prefix: &str) -> String {
    format!("{key_prefix}key-revocations")
}

/// Publishes a revoked key's hash to every router. Failures are logged: the
/// other routers then drop the key when their cache entry expires.
pub async fn publish(state: &RouterState, key_hash: SecretHash) {
    let Some(url) = &state.config.redis_url else {
        return;
    };
    let published = async {
        let client = redis::Client::open(url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        connection
            .publish::<_, _, i64>(channel(&state.config.redis_key_prefix), key_hash.to_hex())
            .await
    };
    match tokio::time::timeout(Duration::from_secs(1), published).await {
        Ok(Ok(receivers)) => debug!(receivers, "key revocation published"),
        Ok(Err(error)) => warn!(error = %error, "failed to publish a key revocation"),
        Err(_) => warn!("publishing a key revocation timed out"),
    }
}

/// Listens for revocations until the router shuts down, reconnecting with a
/// backoff of up to 5 s while Redis is unreachable.
pub async fn listen(state: Arc<RouterState>) {
    let Some(url) = state.config.redis_url.clone() else {
        return;
    };
    let mut delay = Duration::from_millis(200);
    loop {
        let session = subscribe_and_forget(&state, &url);
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            result = session => {
                if let Err(error) = result {
                    warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "revocation listener lost Redis; reconnecting");
                }
            }
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn subscribe_and_forget(state: &RouterState, url: &str) -> redis::RedisResult<()> {
    let client = redis::Client::open(url)?;
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub
        .subscribe(channel(&state.config.redis_key_prefix))
        .await?;
    info!("listening for key revocations");

    let mut messages = pubsub.on_message();
    while let Some(message) = messages.next().await {
        let payload: String = match message.get_payload() {
            Ok(payload) => payload,
            Err(error) => {
                warn!(error = %error, "ignoring an unreadable revocation message");
                continue;
            }
        };
        match hex::decode(&payload)
            .ok()
            .and_then(|bytes| SecretHash::from_bytes(&bytes))
        {
            Some(hash) => state.keys.forget(hash),
            None => warn!("ignoring a revocation message that is not a key hash"),
        }
    }
    Err(redis::RedisError::from((
        redis::ErrorKind::Io,
        "subscription closed",
    )))
}
