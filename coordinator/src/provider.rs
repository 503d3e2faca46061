//! The node's view of one connected provider: its identity, keys, slots, health and
//! the requests in flight on it.
//!
//! A [`ProviderHandle`] is shared by the session task that owns the socket, the
//! scheduler that ranks it, and the dispatch tasks that use it. Everything mutable
//! sits behind small `std` mutexes that are never held across an await.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use switchyard_shared::ids::{AccountId, ModelId, ProviderId, RequestId};
use switchyard_shared::protocol::{
    BackendCapacity, BackendSlotState, CoordinatorMessage, Heartbeat, InferenceResponseChunk,
    SystemMetrics, ThermalState, Usage,
};
use switchyard_shared::seal::PeerKey;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A frame for the session's single writer task.
#[derive(Debug)]
pub enum Outbound {
    Message(CoordinatorMessage),
    /// Close the socket with this code and reason, then stop writing.
    Close(u16, &'static str),
}

/// What a provider sent about one dispatch attempt.
#[derive(Debug)]
pub enum ProviderEvent {
    Accepted,
    Chunk(InferenceResponseChunk),
    Complete(Usage),
    Error {
        status_code: i64,
        message: String,
    },
    /// The socket closed or the provider was evicted.
    Disconnected,
}

/// Concurrency slots, versioned so that the scheduler can tell stale updates apart.
#[derive(Debug, Clone, Copy)]
struct Slots {
    in_flight: u32,
    max: u32,
    generation: u64,
}

/// Load and health reported in heartbeats.
#[derive(Debug, Clone, Copy, Default)]
struct Health {
    metrics: Option<SystemMetrics>,
    /// Requests the provider's own backend reports as waiting.
    backend_waiting: u32,
    /// True when a slot for one of its models reports `crashed` or `reloading`.
    backend_unavailable: bool,
    /// True when no heartbeat has reported backend capacity yet.
    capacity_unknown: bool,
}

/// Where a provider stands on the scheduler's ranking. Lower cost is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankSnapshot {
    /// `None` when the provider cannot take a request now.
    pub cost: Option<u32>,
    pub generation: u64,
}

pub struct ProviderHandle {
    pub id: ProviderId,
    /// Catalog models this provider serves, primary first.
    pub models: Vec<ModelId>,
    /// `None` when the registered key was missing or invalid: such a provider stays
    /// connected but is never routable.
    pub public_key: Option<PeerKey>,
    /// The registered key as sent, compared with each chunk's sender key.
    pub public_key_base64: String,
    /// Account credited with this provider's earnings, if its token was valid.
    pub account: Option<AccountId>,
    /// Decode speed from registration, tokens per second, if the provider sent one.
    decode_tps: Option<f64>,
    outbound: mpsc::Sender<Outbound>,
    pending: Mutex<HashMap<RequestId, mpsc::UnboundedSender<ProviderEvent>>>,
    slots: Mutex<Slots>,
    health: Mutex<Health>,
    /// Set when a challenge failed; cleared when one passes.
    challenge_failed: AtomicBool,
    /// Sticky: a provider that sent an invalid chunk or failed three challenges
    /// stays unroutable until it reconnects.
    untrusted: AtomicBool,
    /// Whether the provider's trust level reaches the node's `min_trust`.
    meets_min_trust: bool,
    last_heartbeat: Mutex<Instant>,
    /// Cancelled to end the session (eviction, shutdown, re-homing).
    pub session_token: CancellationToken,
    /// Close code and reason sent when `session_token` is cancelled by [`ProviderHandle::close`].
    close_frame: Mutex<Option<(u16, &'static str)>>,
    /// Set while the provider waits to move to another node: it takes no new
    /// requests and finishes the ones it has.
    migrating: AtomicBool,
}

impl std::fmt::Debug for ProviderHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderHandle")
            .field("id", &self.id)
            .field("models", &self.models)
            .finish_non_exhaustive()
    }
}

/// Provider-reported numbers are clamped to these ranges before use.
const MAX_DECODE_TPS: f64 = 500.0;

/// Concurrency cap by total memory in GB, used once a provider reports backend
/// capacity: more memory allows more concurrent decodes before each one slows down.
fn concurrency_for_memory(total_memory_gb: f64) -> u32 {
    match total_memory_gb {
        gb if gb <= 24.0 => 2,
        gb if gb <= 48.0 => 4,
        gb if gb <= 96.0 => 6,
        gb if gb <= 128.0 => 8,
        _ => 12,
    }
}

/// Concurrency cap of a provider that has not reported backend capacity.
pub const DEFAULT_CONCURRENCY: u32 = 4;

pub struct NewProvider {
    pub models: Vec<ModelId>,
    pub public_key: Option<PeerKey>,
    pub public_key_base64: String,
    pub account: Option<AccountId>,
    pub decode_tps: Option<f64>,
    pub meets_min_trust: bool,
    pub outbound: mpsc::Sender<Outbound>,
    pub session_token: CancellationToken,
}

impl ProviderHandle {
    pub fn new(provider: NewProvider) -> Self {
        let decode_tps = provider
            .decode_tps
            .filter(|tps| tps.is_finite() && *tps > 0.0)
            .map(|tps| tps.min(MAX_DECODE_TPS));

        Self {
            id: ProviderId::generate(),
            models: provider.models,
            public_key: provider.public_key,
            public_key_base64: provider.public_key_base64,
            account: provider.account,
            decode_tps,
            outbound: provider.outbound,
            pending: Mutex::new(HashMap::new()),
            slots: Mutex::new(Slots {
                in_flight: 0,
                max: DEFAULT_CONCURRENCY,
                generation: 0,
            }),
            health: Mutex::new(Health {
                capacity_unknown: true,
                ..Health::default()
            }),
            challenge_failed: AtomicBool::new(false),
            untrusted: AtomicBool::new(false),
            meets_min_trust: provider.meets_min_trust,
            last_heartbeat: Mutex::new(Instant::now()),
            session_token: provider.session_token,
            close_frame: Mutex::new(None),
            migrating: AtomicBool::new(false),
        }
    }

    /// Queues a frame for the writer task. Returns false if the session is gone.
    pub async fn send(&self, message: Outbound) -> bool {
        self.outbound.send(message).await.is_ok()
    }

    /// Queues a frame without waiting; drops it if the writer is behind or gone.
    /// Used for advisory frames such as `cancel`.
    pub fn try_send(&self, message: Outbound) -> bool {
        self.outbound.try_send(message).is_ok()
    }

    /// Takes a concurrency slot if one is free and the provider is routable.
    pub fn try_acquire_slot(&self) -> bool {
        if !self.is_routable() {
            return false;
        }
        let mut slots = lock(&self.slots);
        if slots.in_flight >= slots.max {
            return false;
        }
        slots.in_flight += 1;
        slots.generation += 1;
        true
    }

    pub fn release_slot(&self) {
        let mut slots = lock(&self.slots);
        slots.in_flight = slots.in_flight.saturating_sub(1);
        slots.generation += 1;
    }

    pub fn in_flight(&self) -> u32 {
        lock(&self.slots).in_flight
    }

    pub fn max_slots(&self) -> u32 {
        lock(&self.slots).max
    }

    /// Decode speed in tokens per second: the registered one, or 50 when the
    /// provider sent none.
    pub fn decode_tps_estimate(&self) -> f64 {
        self.decode_tps.unwrap_or(50.0)
    }

    pub fn free_slots(&self) -> u32 {
        let slots = lock(&self.slots);
        slots.max.saturating_sub(slots.in_flight)
    }

    pub fn is_routable(&self) -> bool {
        !self.migrating.load(Ordering::Acquire)
            && self.public_key.is_some()
            && self.meets_min_trust
            && !self.untrusted.load(Ordering::Acquire)
            && !self.challenge_failed.load(Ordering::Acquire)
            && !self.session_token.is_cancelled()
    }

    /// Ends the session with this close code and reason.
    pub fn close(&self, code: u16, reason: &'static str) {
        *lock(&self.close_frame) = Some((code, reason));
        self.session_token.cancel();
    }

    /// The close frame set by [`ProviderHandle::close`], if any.
    pub fn close_frame(&self) -> Option<(u16, &'static str)> {
        *lock(&self.close_frame)
    }

    /// Starts or stops the wait to move to another node.
    pub fn set_migrating(&self, migrating: bool) {
        self.migrating.store(migrating, Ordering::Release);
        self.bump_generation();
    }

    pub fn is_migrating(&self) -> bool {
        self.migrating.load(Ordering::Acquire)
    }

    /// Marks the provider untrusted until it reconnects.
    pub fn mark_untrusted(&self) {
        self.untrusted.store(true, Ordering::Release);
        self.bump_generation();
    }

    pub fn is_untrusted(&self) -> bool {
        self.untrusted.load(Ordering::Acquire)
    }

    pub fn set_challenge_failed(&self, failed: bool) {
        self.challenge_failed.store(failed, Ordering::Release);
        self.bump_generation();
    }

    fn bump_generation(&self) {
        lock(&self.slots).generation += 1;
    }

    /// Records a heartbeat: liveness, health and backend capacity.
    pub fn record_heartbeat(&self, heartbeat: &Heartbeat) {
        *lock(&self.last_heartbeat) = Instant::now();

        let mut health = lock(&self.health);
        if let Some(metrics) = heartbeat.system_metrics {
            health.metrics = Some(SystemMetrics {
                memory_pressure: clamp_unit(metrics.memory_pressure),
                cpu_usage: clamp_unit(metrics.cpu_usage),
                thermal_state: metrics.thermal_state,
            });
        }
        if let Some(capacity) = &heartbeat.backend_capacity {
            self.apply_capacity(&mut health, capacity);
        }
        drop(health);

        self.bump_generation();
    }

    fn apply_capacity(&self, health: &mut Health, capacity: &BackendCapacity) {
        let ours = capacity
            .slots
            .iter()
            .filter(|slot| self.models.iter().any(|model| model.as_str() == slot.model));

        health.capacity_unknown = false;
        health.backend_waiting = 0;
        health.backend_unavailable = false;
        for slot in ours {
            health.backend_waiting = health.backend_waiting.saturating_add(slot.num_waiting);
            if matches!(
                slot.state,
                BackendSlotState::Crashed | BackendSlotState::Reloading
            ) {
                health.backend_unavailable = true;
            }
        }

        let total_memory_gb = if capacity.total_memory_gb.is_finite() {
            capacity.total_memory_gb.clamp(0.0, 1024.0)
        } else {
            0.0
        };
        lock(&self.slots).max = concurrency_for_memory(total_memory_gb);
    }

    /// Seconds since the last heartbeat (or since registration).
    pub fn heartbeat_age(&self) -> std::time::Duration {
        lock(&self.last_heartbeat).elapsed()
    }

    /// Computes the provider's rank: an estimate in milliseconds of how long a new
    /// request would wait and run here, or `None` if it cannot take one.
    pub fn rank(&self) -> RankSnapshot {
        let slots = *lock(&self.slots);
        let health = *lock(&self.health);

        let available =
            self.is_routable() && slots.in_flight < slots.max && !health.backend_unavailable;
        if !available {
            return RankSnapshot {
                cost: None,
                generation: slots.generation,
            };
        }

        // Decode time of a 1,000-token answer at this provider's speed. Providers
        // that report no speed are assumed to decode at 50 tokens per second.
        let tps = self.decode_tps.unwrap_or(50.0);
        let decode_ms = 1_000_000.0 / tps;
        let in_flight_ms = f64::from(slots.in_flight) * 750.0;
        let waiting_ms = f64::from(health.backend_waiting) * 3_000.0;
        let unknown_ms = if health.capacity_unknown {
            2_500.0
        } else {
            0.0
        };
        let health_ms = health.metrics.map_or(0.0, |metrics| {
            metrics.memory_pressure * 4_000.0
                + metrics.cpu_usage * 1_500.0
                + match metrics.thermal_state {
                    ThermalState::Nominal | ThermalState::Unknown => 0.0,
                    ThermalState::Fair => 2_000.0,
                    ThermalState::Serious => 8_000.0,
                    ThermalState::Critical => 30_000.0,
                }
        });

        let cost = decode_ms + in_flight_ms + waiting_ms + unknown_ms + health_ms;
        RankSnapshot {
            cost: Some(cost.min(f64::from(u32::MAX)) as u32),
            generation: slots.generation,
        }
    }

    /// Registers a dispatch attempt so the session routes its messages here.
    pub fn register_request(
        &self,
        request_id: RequestId,
    ) -> mpsc::UnboundedReceiver<ProviderEvent> {
        let (sender, receiver) = mpsc::unbounded_channel();
        lock(&self.pending).insert(request_id, sender);
        receiver
    }

    /// Forgets a dispatch attempt; later messages for it are dropped.
    pub fn forget_request(&self, request_id: &RequestId) {
        lock(&self.pending).remove(request_id);
    }

    /// Delivers a provider message to the attempt it belongs to. Messages for
    /// unknown or finished attempts are dropped, as the protocol requires.
    pub fn deliver(&self, request_id: &str, event: ProviderEvent) -> bool {
        let pending = lock(&self.pending);
        match pending.get(&RequestId::from(request_id)) {
            Some(sender) => sender.send(event).is_ok(),
            None => false,
        }
    }

    /// Fails every attempt in flight; used when the session ends.
    pub fn fail_all_pending(&self) {
        let pending = std::mem::take(&mut *lock(&self.pending));
        for sender in pending.into_values() {
            let _ = sender.send(ProviderEvent::Disconnected);
        }
    }
}

fn clamp_unit(value: f64) -> f64 {
    if value.is_finite() {
        value.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section here is a plain field update that cannot leave the
    // value half-written, so a poisoned lock still holds consistent data.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use switchyard_shared::seal::KeyPair;

    use super::*;

    fn handle(decode_tps: Option<f64>) -> ProviderHandle {
        let keys = KeyPair::generate();
        let (outbound, _receiver) = mpsc::channel(4);
        ProviderHandle::new(NewProvider {
            models: vec![ModelId::from("m")],
            public_key: Some(PeerKey::from_base64(&keys.public_base64()).unwrap()),
            public_key_base64: keys.public_base64(),
            account: None,
            decode_tps,
            meets_min_trust: true,
            outbound,
            session_token: CancellationToken::new(),
        })
    }

    #[test]
    fn slots_stop_at_concurrency_cap() {
        let provider = handle(None);
        for _ in 0..DEFAULT_CONCURRENCY {
            assert!(provider.try_acquire_slot());
        }
        assert!(!provider.try_acquire_slot());
        assert_eq!(provider.rank().cost, None);

        provider.release_slot();
        assert!(provider.rank().cost.is_some());
        assert!(provider.try_acquire_slot());
    }

    #[test]
    fn faster_provider_ranks_better() {
        let fast = handle(Some(200.0));
        let slow = handle(Some(20.0));
        assert!(fast.rank().cost < slow.rank().cost);
    }

    #[test]
    fn busy_provider_ranks_worse() {
        let provider = handle(None);
        let idle_cost = provider.rank().cost.unwrap();
        assert!(provider.try_acquire_slot());
        assert!(provider.rank().cost.unwrap() > idle_cost);
    }

    #[test]
    fn untrusted_provider_takes_no_slot() {
        let provider = handle(None);
        provider.mark_untrusted();
        assert!(!provider.try_acquire_slot());
        assert_eq!(provider.rank().cost, None);
    }

    #[test]
    fn failed_challenge_blocks_until_passed() {
        let provider = handle(None);
        provider.set_challenge_failed(true);
        assert!(!provider.try_acquire_slot());
        provider.set_challenge_failed(false);
        assert!(provider.try_acquire_slot());
    }

    #[test]
    fn messages_for_unknown_requests_are_dropped() {
        let provider = handle(None);
        assert!(!provider.deliver("nope", ProviderEvent::Accepted));

        let id = RequestId::generate();
        let mut receiver = provider.register_request(id.clone());
        assert!(provider.deliver(id.as_str(), ProviderEvent::Accepted));
        assert!(matches!(receiver.try_recv(), Ok(ProviderEvent::Accepted)));

        provider.forget_request(&id);
        assert!(!provider.deliver(id.as_str(), ProviderEvent::Accepted));
    }
}
