//! Rate limits against the Redis at `SWITCHYARD_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`); each test uses its own key prefix.

use super::*;

fn redis_url() -> String {
    std::env::var("SWITCHYARD_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

fn prefix() -> String {
    format!("switchyard-test:{}:", uuid::Uuid::new_v4().simple())
}

fn defaults(requests_per_minute: u32, tokens_per_minute: u32) -> DefaultLimits {
    DefaultLimits {
        requests_per_minute,
        tokens_per_minute,
    }
}

fn account() -> AccountId {
    AccountId::from("acme")
}

async fn admitted(limiter: &RateLimiter, tokens: u64) -> bool {
    limiter
        .admit(&account(), RateLimits::default(), tokens)
        .await
        .is_ok()
}

#[tokio::test]
async fn redis_limit_counts_requests() {
    let limiter = RateLimiter::new(Some(&redis_url()), &prefix(), defaults(5, 0), 1).unwrap();
    for expected_remaining in (0..5).rev() {
        let admission = limiter
            .admit(&account(), RateLimits::default(), 1)
            .await
            .unwrap();
        assert_eq!(admission.requests_limit, 5);
        assert_eq!(admission.requests_remaining, expected_remaining);
    }

    let refused = limiter
        .admit(&account(), RateLimits::default(), 1)
        .await
        .unwrap_err();
    assert_eq!(refused.kind, ErrorKind::RateLimited);
    assert!(
        refused
            .retry_after_secs
            .is_some_and(|secs| (1..=12).contains(&secs)),
        "{refused:?}"
    );
    assert_eq!(limiter.rejections.value(&[("limit", "requests")]), 1);
    assert_eq!(limiter.fallbacks.value(&[]), 0, "Redis answered");
}

#[tokio::test]
async fn routers_share_one_limit() {
    let shared = prefix();
    let first = RateLimiter::new(Some(&redis_url()), &shared, defaults(6, 0), 2).unwrap();
    let second = RateLimiter::new(Some(&redis_url()), &shared, defaults(6, 0), 2).unwrap();

    let mut allowed = 0;
    for _ in 0..10 {
        allowed += usize::from(admitted(&first, 1).await);
        allowed += usize::from(admitted(&second, 1).await);
    }
    assert_eq!(allowed, 6, "both routers together stay within the limit");
}

#[tokio::test]
async fn token_limit_refuses_large_requests() {
    let limiter = RateLimiter::new(Some(&redis_url()), &prefix(), defaults(0, 1_000), 1).unwrap();
    let admission = limiter
        .admit(&account(), RateLimits::default(), 600)
        .await
        .unwrap();
    assert_eq!(admission.tokens_remaining, 400);

    let refused = limiter
        .admit(&account(), RateLimits::default(), 600)
        .await
        .unwrap_err();
    assert!(refused.message.contains("tokens"), "{}", refused.message);
    assert_eq!(limiter.rejections.value(&[("limit", "tokens")]), 1);
    // A refused request takes nothing: a small one still fits.
    assert!(admitted(&limiter, 300).await);
}

#[tokio::test]
async fn account_limits_override_defaults() {
    let limiter = RateLimiter::new(Some(&redis_url()), &prefix(), defaults(100, 0), 1).unwrap();
    let limits = RateLimits {
        requests_per_minute: Some(2),
        tokens_per_minute: None,
    };
    assert!(limiter.admit(&account(), limits, 1).await.is_ok());
    assert!(limiter.admit(&account(), limits, 1).await.is_ok());
    assert!(limiter.admit(&account(), limits, 1).await.is_err());

    let unlimited = RateLimits {
        requests_per_minute: Some(0),
        tokens_per_minute: None,
    };
    for _ in 0..50 {
        assert!(limiter.admit(&account(), unlimited, 1).await.is_ok());
    }
}

#[tokio::test]
async fn local_limit_without_redis() {
    let limiter = RateLimiter::new(None, &prefix(), defaults(3, 0), 1).unwrap();
    let mut allowed = 0;
    for _ in 0..10 {
        allowed += usize::from(admitted(&limiter, 1).await);
    }
    assert_eq!(allowed, 3);
    assert_eq!(
        limiter.fallbacks.value(&[]),
        0,
        "no Redis is configured, so nothing falls back"
    );
}

#[tokio::test]
async fn unreachable_redis_falls_back_to_share() {
    // Nothing listens on port 1 of loopback.
    let limiter =
        RateLimiter::new(Some("redis://127.0.0.1:1"), &prefix(), defaults(10, 0), 2).unwrap();
    let mut allowed = 0;
    for _ in 0..10 {
        allowed += usize::from(admitted(&limiter, 1).await);
    }
    assert_eq!(allowed, 5, "each of two routers allows half the limit");
    assert_eq!(limiter.fallbacks.value(&[]), 10);
}

#[tokio::test]
async fn fallback_uses_counted_routers() {
    let limiter =
        RateLimiter::new(Some("redis://127.0.0.1:1"), &prefix(), defaults(12, 0), 1).unwrap();
    limiter.set_router_count(4);
    let mut allowed = 0;
    for _ in 0..12 {
        allowed += usize::from(admitted(&limiter, 1).await);
    }
    assert_eq!(
        allowed, 3,
        "a quarter of the limit with four routers counted"
    );
}
