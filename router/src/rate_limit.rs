//! Per-account rate limits shared by every router: requests per minute and
//! tokens per minute, each a GCRA (generic cell rate algorithm) bucket that
//! allows a minute's worth of traffic at once and refills evenly.
//!
//! The buckets live in Redis and one Lua script checks and updates both
//! atomically, using Redis's clock, so all routers see one limit. A Redis call
//! that fails or takes longer than the timeout falls back to a bucket in this
//! router's memory at the limit divided by the number of routers; the switch is
//! logged once and counted in `switchyard_router_rate_limit_fallbacks_total`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderValue};
use switchyard_shared::api::{ApiError, ErrorKind};
use switchyard_shared::ids::AccountId;
use switchyard_shared::ledger::RateLimits;
use switchyard_shared::metrics::CounterFamily;
use tracing::{info, warn};

/// Window of both limits: a limit of L per minute allows L at once.
const WINDOW_MS: f64 = 60_000.0;

/// Checks both buckets of one account and takes from them only if both allow.
/// KEYS: requests bucket, tokens bucket. ARGV: requests limit, requests cost,
/// tokens limit, tokens cost (a limit of 0 means none). Returns {allowed, which
/// bucket refused (1 or 2), retry after ms, remaining requests, remaining tokens}.
const GCRA_SCRIPT: &str = r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local window = 60000
local new_tats = {}
local remaining = {-1, -1}
for i = 1, 2 do
    local limit = tonumber(ARGV[(i - 1) * 2 + 1])
    local cost = tonumber(ARGV[(i - 1) * 2 + 2])
    if limit > 0 then
        local interval = window / limit
        local tat = tonumber(redis.call('GET', KEYS[i]) or now)
        if tat < now then tat = now end
        local new_tat = tat + interval * math.min(cost, limit)
        local allow_at = new_tat - window
        if allow_at > now then
            return {0, i, math.ceil(allow_at - now), 0, 0}
        end
        new_tats[i] = new_tat
        remaining[i] = math.floor((window - (new_tat - now)) / interval)
    end
end
for i = 1, 2 do
    if new_tats[i] then
        redis.call('SET', KEYS[i], tostring(new_tats[i]), 'PX', math.ceil(new_tats[i] - now) + 1000)
    end
end
return {1, 0, 0, remaining[1], remaining[2]}
"#;

/// Limits applied when an account sets none.
#[derive(Clone, Copy, Debug)]
pub struct DefaultLimits {
    /// Zero means no limit.
    pub requests_per_minute: u32,
    /// Zero means no limit.
    pub tokens_per_minute: u32,
}

/// What an admitted request learns about its limits, sent as `x-ratelimit-*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admission {
    pub requests_limit: u32,
    pub requests_remaining: i64,
    pub tokens_limit: u32,
    pub tokens_remaining: i64,
}

impl Admission {
    /// Adds the `x-ratelimit-*` headers of the limits in force.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let mut set = |name: &'static str, value: i64| {
            headers.insert(name, HeaderValue::from(value.max(0)));
        };
        if self.requests_limit > 0 {
            set("x-ratelimit-limit-requests", i64::from(self.requests_limit));
            set("x-ratelimit-remaining-requests", self.requests_remaining);
        }
        if self.tokens_limit > 0 {
            set("x-ratelimit-limit-tokens", i64::from(self.tokens_limit));
            set("x-ratelimit-remaining-tokens", self.tokens_remaining);
        }
    }
}

pub struct RateLimiter {
    redis: Option<deadpool_redis::Pool>,
    /// Prefix of every Redis key, so clusters (and tests) can share a server.
    key_prefix: String,
    defaults: DefaultLimits,
    /// Routers sharing the limits, as last counted on the bus (or configured);
    /// the local fallback allows 1/routers of them.
    routers: std::sync::atomic::AtomicU32,
    timeout: Duration,
    script: redis::Script,
    /// Theoretical arrival times of the local buckets, in milliseconds since `epoch`.
    local: Mutex<HashMap<String, f64>>,
    epoch: Instant,
    degraded: AtomicBool,
    pub fallbacks: CounterFamily,
    pub rejections: CounterFamily,
}

impl RateLimiter {
    /// Creates a limiter on Redis at `redis_url`, or a local one when `None`.
    pub fn new(
        redis_url: Option<&str>,
        key_prefix: &str,
        defaults: DefaultLimits,
        routers: u32,
    ) -> Result<Self, String> {
        let redis = match redis_url {
            Some(url) => {
                let config = deadpool_redis::Config::from_url(url);
                let pool = config
                    .create_pool(Some(deadpool_redis::Runtime::Tokio1))
                    .map_err(|error| format!("invalid Redis URL: {error}"))?;
                Some(pool)
            }
            None => None,
        };
        Ok(Self {
            redis,
            key_prefix: key_prefix.to_owned(),
            defaults,
            routers: std::sync::atomic::AtomicU32::new(routers.max(1)),
            timeout: Duration::from_millis(100),
            script: redis::Script::new(GCRA_SCRIPT),
            local: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            degraded: AtomicBool::new(false),
            fallbacks: CounterFamily::default(),
            rejections: CounterFamily::default(),
        })
    }

    /// Records how many routers share the limits, as counted on the bus.
    pub fn set_router_count(&self, routers: usize) {
        let routers = u32::try_from(routers).unwrap_or(u32::MAX).max(1);
        self.routers.store(routers, Ordering::Relaxed);
    }

    /// Checks that `redis_url`, when given, is a valid Redis URL.
    pub fn check_url(redis_url: Option<&str>) -> Result<(), String> {
        match redis_url {
            Some(url) => redis::Client::open(url)
                .map(|_| ())
                .map_err(|error| format!("invalid Redis URL: {error}")),
            None => Ok(()),
        }
    }

    /// Admits one request of `tokens` estimated tokens for `account`, or returns
    /// a 429 with `Retry-After`.
    pub async fn admit(
        &self,
        account: &AccountId,
        limits: RateLimits,
        tokens: u64,
    ) -> Result<Admission, ApiError> {
        let requests_limit = limits
            .requests_per_minute
            .unwrap_or(self.defaults.requests_per_minute);
        let tokens_limit = limits
            .tokens_per_minute
            .unwrap_or(self.defaults.tokens_per_minute);
        if requests_limit == 0 && tokens_limit == 0 {
            return Ok(Admission {
                requests_limit,
                requests_remaining: -1,
                tokens_limit,
                tokens_remaining: -1,
            });
        }

        let checked = match &self.redis {
            Some(pool) => match self
                .check_redis(pool, account, requests_limit, tokens_limit, tokens)
                .await
            {
                Ok(checked) => {
                    if self.degraded.swap(false, Ordering::Relaxed) {
                        info!("rate limits are shared through Redis again");
                    }
                    checked
                }
                Err(error) => {
                    self.fallbacks.increment(&[]);
                    let routers = self.routers.load(Ordering::Relaxed).max(1);
                    if !self.degraded.swap(true, Ordering::Relaxed) {
                        warn!(error = %error, routers, "Redis is unreachable; rate limits fall back to this router's share");
                    }
                    self.check_local(
                        account,
                        requests_limit / routers,
                        tokens_limit / routers,
                        tokens,
                    )
                }
            },
            None => self.check_local(account, requests_limit, tokens_limit, tokens),
        };

        match checked {
            Checked::Allowed(admission) => Ok(Admission {
                requests_limit,
                tokens_limit,
                ..admission
            }),
            Checked::Refused {
                bucket,
                retry_after_ms,
            } => {
                self.rejections.increment(&[("limit", bucket)]);
                let seconds = u32::try_from(retry_after_ms.div_ceil(1000))
                    .unwrap_or(u32::MAX)
                    .max(1);
                Err(ApiError::new(
                    ErrorKind::RateLimited,
                    format!("rate limit of {bucket} per minute exceeded; retry in {seconds} s"),
                )
                .with_retry_after(seconds))
            }
        }
    }

    async fn check_redis(
        &self,
        pool: &deadpool_redis::Pool,
        account: &AccountId,
        requests_limit: u32,
        tokens_limit: u32,
        tokens: u64,
    ) -> Result<Checked, String> {
        let call = async {
            let mut connection = pool.get().await.map_err(|error| error.to_string())?;
            let reply: (i64, i64, i64, i64, i64) = self
                .script
                .key(format!(
                    "{}ratelimit:{{{account}}}:requests",
                    self.key_prefix
                ))
                .key(format!("{}ratelimit:{{{account}}}:tokens", self.key_prefix))
                .arg(requests_limit)
                .arg(1)
                .arg(tokens_limit)
                .arg(tokens)
                .invoke_async(&mut connection)
                .await
                .map_err(|error| error.to_string())?;
            Ok::<_, String>(reply)
        };
        let (allowed, bucket, retry_after_ms, requests_remaining, tokens_remaining) =
            tokio::time::timeout(self.timeout, call)
                .await
                .map_err(|_| "Redis call timed out".to_owned())??;

        Ok(if allowed == 1 {
            Checked::Allowed(Admission {
                requests_limit,
                requests_remaining,
                tokens_limit,
                tokens_remaining,
            })
        } else {
            Checked::Refused {
                bucket: if bucket == 1 { "requests" } else { "tokens" },
                retry_after_ms: u64::try_from(retry_after_ms).unwrap_or(0),
            }
        })
    }

    /// The same algorithm as the script, on this router's own buckets.
    fn check_local(
        &self,
        account: &AccountId,
        requests_limit: u32,
        tokens_limit: u32,
        tokens: u64,
    ) -> Checked {
        let now = self.epoch.elapsed().as_secs_f64() * 1000.0;
        let mut buckets = self
            .local
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let plans = [
            ("requests", requests_limit, 1u64),
            ("tokens", tokens_limit, tokens),
        ];

        let mut updates = Vec::new();
        let mut remaining = [-1i64, -1i64];
        for (index, (bucket, limit, cost)) in plans.into_iter().enumerate() {
            if limit == 0 {
                continue;
            }
            let key = format!("{account}:{bucket}");
            let interval = WINDOW_MS / f64::from(limit);
            let tat = buckets.get(&key).copied().unwrap_or(now).max(now);
            let new_tat = tat + interval * cost.min(u64::from(limit)) as f64;
            let allow_at = new_tat - WINDOW_MS;
            if allow_at > now {
                return Checked::Refused {
                    bucket,
                    retry_after_ms: (allow_at - now).ceil() as u64,
                };
            }
            remaining[index] = ((WINDOW_MS - (new_tat - now)) / interval).floor() as i64;
            updates.push((key, new_tat));
        }
        for (key, new_tat) in updates {
            buckets.insert(key, new_tat);
        }
        Checked::Allowed(Admission {
            requests_limit,
            requests_remaining: remaining[0],
            tokens_limit,
            tokens_remaining: remaining[1],
        })
    }
}

enum Checked {
    Allowed(Admission),
    Refused {
        bucket: &'static str,
        retry_after_ms: u64,
    },
}

#[cfg(test)]
mod tests;
