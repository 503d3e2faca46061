use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use switchyard_shared::ids::{ModelId, ProviderId};
use switchyard_shared::seal::{KeyPair, PeerKey};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::provider::{DEFAULT_CONCURRENCY, NewProvider, ProviderHandle};

const MODEL_A: &str = "model-a";
const MODEL_B: &str = "model-b";

/// Long enough that a test waiting on it fails by assertion, not by hanging.
const LONG_WAIT: Duration = Duration::from_secs(5);

fn model(name: &str) -> ModelId {
    ModelId::from(name)
}

/// Builds a routable provider for `models`. Frames queued for it are dropped.
fn provider(models: &[&str], decode_tps: Option<f64>) -> Arc<ProviderHandle> {
    let keys = KeyPair::generate();
    let (outbound, _receiver) = mpsc::channel(4);
    Arc::new(ProviderHandle::new(NewProvider {
        models: models.iter().map(|name| model(name)).collect(),
        public_key: Some(PeerKey::from_base64(&keys.public_base64()).unwrap()),
        public_key_base64: keys.public_base64(),
        account: None,
        decode_tps,
        meets_min_trust: true,
        outbound,
        session_token: CancellationToken::new(),
    }))
}

fn scheduler_with(queue_capacity: usize, providers: &[&Arc<ProviderHandle>]) -> Arc<Scheduler> {
    let scheduler = Scheduler::new(queue_capacity);
    for provider in providers {
        scheduler.add(provider);
    }
    scheduler
}

/// Claims `count` slots for `name` without queueing, panicking if any claim fails.
fn take_slots(scheduler: &Arc<Scheduler>, name: &str, count: u32) -> Vec<SlotGuard> {
    (0..count)
        .map(|_| scheduler.try_place(&model(name), &[]).unwrap())
        .collect()
}

fn capacity_of(scheduler: &Scheduler, name: &str) -> ModelCapacity {
    scheduler
        .model_capacity()
        .into_iter()
        .find(|capacity| capacity.model == model(name))
        .unwrap()
}

/// Polls until `name`'s queue contains `depth` waiters, failing after `LONG_WAIT`.
async fn wait_for_queue_depth(scheduler: &Scheduler, name: &str, depth: usize) {
    let deadline = Instant::now() + LONG_WAIT;
    while capacity_of(scheduler, name).queue_depth != depth {
        assert!(
            Instant::now() < deadline,
            "queue depth of {name} never reached {depth}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Spawns `place` for `name` so that it can wait in the queue while the test acts.
fn spawn_place(
    scheduler: &Arc<Scheduler>,
    name: &str,
    exclude: Vec<ProviderId>,
    timeout: Duration,
) -> tokio::task::JoinHandle<Result<SlotGuard, PlacementError>> {
    let scheduler = scheduler.clone();
    let model = model(name);
    tokio::spawn(async move { scheduler.place(&model, &exclude, timeout).await })
}

#[test]
fn placement_prefers_faster_provider() {
    let fast = provider(&[MODEL_A], Some(200.0));
    let slow = provider(&[MODEL_A], Some(20.0));
    let scheduler = scheduler_with(10, &[&slow, &fast]);

    let first = scheduler.try_place(&model(MODEL_A), &[]).unwrap();
    assert_eq!(first.provider().id, fast.id);

    // The fast provider stays cheaper than the slow one until it reaches its cap.
    let mut guards = vec![first];
    guards.extend(take_slots(&scheduler, MODEL_A, DEFAULT_CONCURRENCY - 1));
    assert_eq!(fast.in_flight(), DEFAULT_CONCURRENCY);
    assert_eq!(slow.in_flight(), 0);

    let overflow = scheduler.try_place(&model(MODEL_A), &[]).unwrap();
    assert_eq!(overflow.provider().id, slow.id);
}

#[test]
fn provider_at_cap_is_skipped() {
    let only = provider(&[MODEL_A], None);
    let scheduler = scheduler_with(10, &[&only]);

    let mut guards = take_slots(&scheduler, MODEL_A, DEFAULT_CONCURRENCY);
    assert_eq!(only.in_flight(), DEFAULT_CONCURRENCY);
    assert_eq!(
        scheduler.try_place(&model(MODEL_A), &[]).err(),
        Some(PlacementError::QueueFull)
    );
    assert_eq!(only.in_flight(), DEFAULT_CONCURRENCY);

    drop(guards.pop());
    assert_eq!(only.in_flight(), DEFAULT_CONCURRENCY - 1);

    let again = scheduler.try_place(&model(MODEL_A), &[]).unwrap();
    assert_eq!(again.provider().id, only.id);
    assert_eq!(only.in_flight(), DEFAULT_CONCURRENCY);
}

#[test]
fn dropped_guards_free_every_slot() {
    let only = provider(&[MODEL_A], None);
    let scheduler = scheduler_with(10, &[&only]);

    let guards = take_slots(&scheduler, MODEL_A, DEFAULT_CONCURRENCY);
    drop(guards);
    assert_eq!(only.in_flight(), 0);
    assert_eq!(
        capacity_of(&scheduler, MODEL_A).free_slots,
        DEFAULT_CONCURRENCY as usize
    );

    let guards = take_slots(&scheduler, MODEL_A, DEFAULT_CONCURRENCY);
    assert_eq!(guards.len(), DEFAULT_CONCURRENCY as usize);
}

#[tokio::test]
async fn exclude_skips_listed_providers() {
    let fast = provider(&[MODEL_A], Some(200.0));
    let slow = provider(&[MODEL_A], Some(20.0));
    let scheduler = scheduler_with(10, &[&fast, &slow]);

    let guard = scheduler.try_place(&model(MODEL_A), &[fast.id]).unwrap();
    assert_eq!(guard.provider().id, slow.id);
    assert_eq!(fast.in_flight(), 0);

    assert_eq!(
        scheduler
            .try_place(&model(MODEL_A), &[fast.id, slow.id])
            .err(),
        Some(PlacementError::NoProviders)
    );

    // Excluding every provider fails at once instead of waiting in the queue.
    let started = Instant::now();
    let placed = scheduler
        .place(&model(MODEL_A), &[fast.id, slow.id], LONG_WAIT)
        .await;
    assert_eq!(placed.err(), Some(PlacementError::NoProviders));
    assert!(started.elapsed() < LONG_WAIT);
    assert_eq!(capacity_of(&scheduler, MODEL_A).queue_depth, 0);
}

#[tokio::test]
async fn unknown_model_has_no_providers() {
    let known = provider(&[MODEL_A], None);
    let scheduler = scheduler_with(10, &[&known]);
    let unknown = model("not-served");

    assert_eq!(scheduler.provider_count(&unknown), 0);
    assert_eq!(
        scheduler.try_place(&unknown, &[]).err(),
        Some(PlacementError::NoProviders)
    );
    assert_eq!(
        scheduler.place(&unknown, &[], LONG_WAIT).await.err(),
        Some(PlacementError::NoProviders)
    );
    assert_eq!(known.in_flight(), 0);
}

#[test]
fn models_share_provider_slots() {
    let shared = provider(&[MODEL_A, MODEL_B], None);
    let scheduler = scheduler_with(10, &[&shared]);

    let mut guards = take_slots(&scheduler, MODEL_A, DEFAULT_CONCURRENCY - 1);
    assert_eq!(capacity_of(&scheduler, MODEL_B).free_slots, 1);

    guards.push(scheduler.try_place(&model(MODEL_B), &[]).unwrap());
    assert_eq!(shared.in_flight(), DEFAULT_CONCURRENCY);
    assert_eq!(
        scheduler.try_place(&model(MODEL_A), &[]).err(),
        Some(PlacementError::QueueFull)
    );
    assert_eq!(
        scheduler.try_place(&model(MODEL_B), &[]).err(),
        Some(PlacementError::QueueFull)
    );
    assert_eq!(capacity_of(&scheduler, MODEL_A).free_slots, 0);
    assert_eq!(capacity_of(&scheduler, MODEL_B).free_slots, 0);

    drop(guards);
    assert_eq!(shared.in_flight(), 0);
    assert_eq!(
        capacity_of(&scheduler, MODEL_A).free_slots,
        DEFAULT_CONCURRENCY as usize
    );
    assert_eq!(
        capacity_of(&scheduler, MODEL_B).free_slots,
        DEFAULT_CONCURRENCY as usize
    );

    let guards = take_slots(&scheduler, MODEL_B, DEFAULT_CONCURRENCY);
    assert_eq!(guards.len(), DEFAULT_CONCURRENCY as usize);
    assert_eq!(
        scheduler.try_place(&model(MODEL_A), &[]).err(),
        Some(PlacementError::QueueFull)
    );
}

#[test]
fn remove_clears_every_pool() {
    let shared = provider(&[MODEL_A, MODEL_B], Some(200.0));
    let other = provider(&[MODEL_A], Some(20.0));
    let scheduler = scheduler_with(10, &[&shared, &other]);
    let held = scheduler.try_place(&model(MODEL_A), &[]).unwrap();
    assert_eq!(held.provider().id, shared.id);

    scheduler.remove(&shared);
    assert_eq!(scheduler.provider_count(&model(MODEL_A)), 1);
    assert_eq!(scheduler.provider_count(&model(MODEL_B)), 0);
    assert_eq!(
        scheduler.try_place(&model(MODEL_B), &[]).err(),
        Some(PlacementError::NoProviders)
    );

    // A guard dropped after removal frees its slot but does not re-add the provider.
    drop(held);
    assert_eq!(shared.in_flight(), 0);
    assert_eq!(scheduler.provider_count(&model(MODEL_A)), 1);
    let guards = take_slots(&scheduler, MODEL_A, DEFAULT_CONCURRENCY);
    for guard in &guards {
        assert_eq!(guard.provider().id, other.id);
    }
    assert_eq!(shared.in_flight(), 0);
    assert_eq!(
        scheduler.try_place(&model(MODEL_A), &[]).err(),
        Some(PlacementError::QueueFull)
    );
}

#[test]
fn load_spreads_over_equal_providers() {
    let providers: Vec<Arc<ProviderHandle>> = (0..4).map(|_| provider(&[MODEL_A], None)).collect();
    let scheduler = scheduler_with(10, &providers.iter().collect::<Vec<_>>());

    let mut guards = Vec::new();
    for round in 1..=DEFAULT_CONCURRENCY {
        guards.extend(take_slots(&scheduler, MODEL_A, providers.len() as u32));
        for provider in &providers {
            assert_eq!(provider.in_flight(), round, "after round {round}");
        }
    }
    assert_eq!(
        scheduler.try_place(&model(MODEL_A), &[]).err(),
        Some(PlacementError::QueueFull)
    );
}

#[tokio::test]
async fn queued_request_gets_freed_slot() {
    let only = provider(&[MODEL_A], None);
    let scheduler = scheduler_with(10, &[&only]);
    let mut guards = take_slots(&scheduler, MODEL_A, DEFAULT_CONCURRENCY);

    let (release, released) = oneshot::channel::<()>();
    let guard = guards.pop().unwrap();
    tokio::spawn(async move {
        released.await.unwrap();
        drop(guard);
    });

    let waiter = spawn_place(&scheduler, MODEL_A, Vec::new(), LONG_WAIT);
    wait_for_queue_depth(&scheduler, MODEL_A, 1).await;
    assert!(!waiter.is_finished());

    release.send(()).unwrap();
    let placed = waiter.await.unwrap().unwrap();
    assert_eq!(placed.provider().id, only.id);
    assert_eq!(only.in_flight(), DEFAULT_CONCURRENCY);
    assert_eq!(capacity_of(&scheduler, MODEL_A).queue_depth, 0);
}

#[tokio::test]
async fn queued_request_times_out() {
    let only = provider(&[MODEL_A], None);
    let scheduler = scheduler_with(10, &[&only]);
    let _guards = take_slots(&scheduler, MODEL_A, DEFAULT_CONCURRENCY);

    let timeout = Duration::from_millis(50);
    let started = Instant::now();
    let placed = scheduler.place(&model(MODEL_A), &[], timeout).await;
    assert_eq!(placed.err(), Some(PlacementError::QueueTimeout));
    assert!(started.elapsed() >= timeout);
    assert_eq!(capacity_of(&scheduler, MODEL_A).queue_depth, 0);
    assert_eq!(only.in_flight(), DEFAULT_CONCURRENCY);
}

#[tokio::test]
async fn full_queue_rejects_request() {
    let only = provider(&[MODEL_A], None);
    let scheduler = scheduler_with(1, &[&only]);
    let mut guards = take_slots(&scheduler, MODEL_A, DEFAULT_CONCURRENCY);

    let waiter = spawn_place(&scheduler, MODEL_A, Vec::new(), LONG_WAIT);
    wait_for_queue_depth(&scheduler, MODEL_A, 1).await;

    let started = Instant::now();
    let rejected = scheduler.place(&model(MODEL_A), &[], LONG_WAIT).await;
    assert_eq!(rejected.err(), Some(PlacementError::QueueFull));
    assert!(started.elapsed() < LONG_WAIT);
    assert_eq!(capacity_of(&scheduler, MODEL_A).queue_depth, 1);

    // The rejected request did not take the queued one's place.
    drop(guards.pop());
    let placed = waiter.await.unwrap().unwrap();
    assert_eq!(placed.provider().id, only.id);
    assert_eq!(capacity_of(&scheduler, MODEL_A).queue_depth, 0);
}

#[tokio::test]
async fn zero_capacity_queue_rejects_waiting() {
    let only = provider(&[MODEL_A], None);
    let scheduler = scheduler_with(0, &[&only]);
    let _guards = take_slots(&scheduler, MODEL_A, DEFAULT_CONCURRENCY);

    let placed = scheduler.place(&model(MODEL_A), &[], LONG_WAIT).await;
    assert_eq!(placed.err(), Some(PlacementError::QueueFull));
    assert_eq!(capacity_of(&scheduler, MODEL_A).queue_depth, 0);
}

#[tokio::test]
async fn queued_request_uses_new_provider() {
    let busy = provider(&[MODEL_A], None);
    let scheduler = scheduler_with(10, &[&busy]);
    let _guards = take_slots(&scheduler, MODEL_A, DEFAULT_CONCURRENCY);

    let waiter = spawn_place(&scheduler, MODEL_A, Vec::new(), LONG_WAIT);
    wait_for_queue_depth(&scheduler, MODEL_A, 1).await;

    let joined = provider(&[MODEL_A], None);
    scheduler.add(&joined);
    let placed = waiter.await.unwrap().unwrap();
    assert_eq!(placed.provider().id, joined.id);
}

#[tokio::test]
async fn freed_slot_wakes_other_model_queue() {
    let shared = provider(&[MODEL_A, MODEL_B], None);
    let scheduler = scheduler_with(10, &[&shared]);
    let mut guards = take_slots(&scheduler, MODEL_A, DEFAULT_CONCURRENCY);

    let waiter = spawn_place(&scheduler, MODEL_B, Vec::new(), LONG_WAIT);
    wait_for_queue_depth(&scheduler, MODEL_B, 1).await;

    drop(guards.pop());
    let placed = waiter.await.unwrap().unwrap();
    assert_eq!(placed.provider().id, shared.id);
    assert_eq!(shared.in_flight(), DEFAULT_CONCURRENCY);
}

#[test]
fn unroutable_providers_are_not_placed() {
    type MakeUnroutable = fn(&ProviderHandle);
    let cases: [(&str, MakeUnroutable); 3] = [
        ("untrusted", |provider| provider.mark_untrusted()),
        ("challenge failed", |provider| {
            provider.set_challenge_failed(true)
        }),
        ("session cancelled", |provider| {
            provider.session_token.cancel()
        }),
    ];

    for (case, make_unroutable) in cases {
        let blocked = provider(&[MODEL_A], Some(200.0));
        let fallback = provider(&[MODEL_A], Some(20.0));
        let scheduler = scheduler_with(10, &[&blocked, &fallback]);

        make_unroutable(&blocked);
        scheduler.refresh(&blocked);
        let guard = scheduler.try_place(&model(MODEL_A), &[]).unwrap();
        assert_eq!(guard.provider().id, fallback.id, "{case}");

        scheduler.remove(&fallback);
        drop(guard);
        assert!(scheduler.try_place(&model(MODEL_A), &[]).is_err(), "{case}");
        assert_eq!(blocked.in_flight(), 0, "{case}");
        assert_eq!(scheduler.provider_count(&model(MODEL_A)), 1, "{case}");
    }
}

#[test]
fn stale_rank_is_skipped() {
    // Without a refresh the pool still ranks the provider first, so placement
    // must notice the failed claim and move on.
    let untrusted = provider(&[MODEL_A], Some(200.0));
    let trusted = provider(&[MODEL_A], Some(20.0));
    let scheduler = scheduler_with(10, &[&untrusted, &trusted]);
    untrusted.mark_untrusted();

    let guard = scheduler.try_place(&model(MODEL_A), &[]).unwrap();
    assert_eq!(guard.provider().id, trusted.id);
    assert_eq!(untrusted.in_flight(), 0);
}

#[test]
fn passed_challenge_restores_placement() {
    let only = provider(&[MODEL_A], None);
    let scheduler = scheduler_with(10, &[&only]);

    only.set_challenge_failed(true);
    scheduler.refresh(&only);
    assert_eq!(
        scheduler.try_place(&model(MODEL_A), &[]).err(),
        Some(PlacementError::QueueFull)
    );

    only.set_challenge_failed(false);
    scheduler.refresh(&only);
    let guard = scheduler.try_place(&model(MODEL_A), &[]).unwrap();
    assert_eq!(guard.provider().id, only.id);
}

#[tokio::test]
async fn model_capacity_reports_counts() {
    let single = provider(&[MODEL_A], None);
    let shared = provider(&[MODEL_A, MODEL_B], None);
    let scheduler = scheduler_with(10, &[&single, &shared]);
    let cap = DEFAULT_CONCURRENCY as usize;

    let mut capacities = scheduler.model_capacity();
    capacities.sort_by(|left, right| left.model.cmp(&right.model));
    assert_eq!(
        capacities,
        vec![
            ModelCapacity {
                model: model(MODEL_A),
                providers: 2,
                total_slots: 2 * cap,
                free_slots: 2 * cap,
                queue_depth: 0,
                decode_tokens_per_second: 100.0,
            },
            ModelCapacity {
                model: model(MODEL_B),
                providers: 1,
                total_slots: cap,
                free_slots: cap,
                queue_depth: 0,
                decode_tokens_per_second: 50.0,
            },
        ]
    );

    let _guards = take_slots(&scheduler, MODEL_B, DEFAULT_CONCURRENCY);
    let waiter = spawn_place(&scheduler, MODEL_B, Vec::new(), LONG_WAIT);
    wait_for_queue_depth(&scheduler, MODEL_B, 1).await;

    let model_a = capacity_of(&scheduler, MODEL_A);
    assert_eq!(model_a.providers, 2);
    assert_eq!(model_a.free_slots, cap);
    assert_eq!(model_a.queue_depth, 0);
    let model_b = capacity_of(&scheduler, MODEL_B);
    assert_eq!(model_b.providers, 1);
    assert_eq!(model_b.free_slots, 0);
    assert_eq!(model_b.queue_depth, 1);

    // Removal drops the provider from the counts even while its slots are held.
    scheduler.remove(&shared);
    assert_eq!(capacity_of(&scheduler, MODEL_A).providers, 1);
    assert_eq!(capacity_of(&scheduler, MODEL_A).free_slots, cap);
    assert_eq!(capacity_of(&scheduler, MODEL_B).providers, 0);
    waiter.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_placement_respects_caps() {
    const TASKS: usize = 32;
    const ROUNDS: usize = 200;

    // Two pools that overlap on one provider, so slots are shared across models.
    let providers = vec![
        provider(&[MODEL_A], Some(100.0)),
        provider(&[MODEL_A], None),
        provider(&[MODEL_A, MODEL_B], Some(80.0)),
        provider(&[MODEL_B], Some(30.0)),
    ];
    let scheduler = scheduler_with(TASKS, &providers.iter().collect::<Vec<_>>());

    // Counted independently of the handles, so a double claim cannot hide.
    let claims_per_provider: Arc<HashMap<ProviderId, AtomicU32>> = Arc::new(
        providers
            .iter()
            .map(|provider| (provider.id, AtomicU32::new(0)))
            .collect(),
    );
    let stop = Arc::new(AtomicBool::new(false));

    let monitor = {
        let providers = providers.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut samples = 0u64;
            while !stop.load(Ordering::Acquire) {
                for provider in &providers {
                    assert!(provider.in_flight() <= DEFAULT_CONCURRENCY);
                }
                samples += 1;
                tokio::task::yield_now().await;
            }
            samples
        })
    };

    let mut workers = Vec::new();
    for task in 0..TASKS {
        let scheduler = scheduler.clone();
        let claims_per_provider = claims_per_provider.clone();
        let name = if task % 2 == 0 { MODEL_A } else { MODEL_B };
        workers.push(tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let guard = scheduler
                    .place(&model(name), &[], Duration::from_secs(10))
                    .await
                    .unwrap();
                let counter = &claims_per_provider[&guard.provider().id];
                let count = counter.fetch_add(1, Ordering::AcqRel) + 1;
                assert!(count <= DEFAULT_CONCURRENCY);
                assert!(guard.provider().in_flight() <= DEFAULT_CONCURRENCY);
                tokio::task::yield_now().await;
                counter.fetch_sub(1, Ordering::AcqRel);
                drop(guard);
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    stop.store(true, Ordering::Release);
    assert!(monitor.await.unwrap() > 0);

    for provider in &providers {
        assert_eq!(provider.in_flight(), 0);
    }
    assert_eq!(capacity_of(&scheduler, MODEL_A).queue_depth, 0);
    assert_eq!(capacity_of(&scheduler, MODEL_B).queue_depth, 0);

    // Every provider must be ranked again: all its slots can be claimed once more.
    let mut guards = take_slots(&scheduler, MODEL_A, 3 * DEFAULT_CONCURRENCY);
    guards.extend(take_slots(&scheduler, MODEL_B, DEFAULT_CONCURRENCY));
    for provider in &providers {
        assert_eq!(provider.in_flight(), DEFAULT_CONCURRENCY);
    }
    assert_eq!(
        scheduler.try_place(&model(MODEL_A), &[]).err(),
        Some(PlacementError::QueueFull)
    );
    assert_eq!(
        scheduler.try_place(&model(MODEL_B), &[]).err(),
        Some(PlacementError::QueueFull)
    );
}

// NOTE: fails today. A freed slot wakes only the longest-waiting request, and when
// that request excludes the slot's provider it goes back to sleep without passing
// the wakeup on, so a request that could use the slot waits out its whole timeout.
#[tokio::test]
async fn excluding_waiter_passes_wakeup_on() {
    let first = provider(&[MODEL_A], None);
    let second = provider(&[MODEL_A], None);
    let scheduler = scheduler_with(10, &[&first, &second]);
    let mut guards = take_slots(&scheduler, MODEL_A, 2 * DEFAULT_CONCURRENCY);

    let timeout = Duration::from_millis(500);
    let excluding = spawn_place(&scheduler, MODEL_A, vec![first.id], timeout);
    wait_for_queue_depth(&scheduler, MODEL_A, 1).await;
    let open = spawn_place(&scheduler, MODEL_A, Vec::new(), timeout);
    wait_for_queue_depth(&scheduler, MODEL_A, 2).await;

    let index = guards
        .iter()
        .position(|guard| guard.provider().id == first.id)
        .unwrap();
    drop(guards.remove(index));

    let started = Instant::now();
    let placed = open.await.unwrap();
    assert_eq!(first.free_slots(), 0, "the slot on `first` stayed free");
    assert!(started.elapsed() < timeout);
    assert_eq!(placed.unwrap().provider().id, first.id);
    assert_eq!(
        excluding.await.unwrap().err(),
        Some(PlacementError::QueueTimeout)
    );
}
