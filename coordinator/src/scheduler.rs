//! Placement of requests on a node's providers.
//!
//! Each model has its own pool: an ordered set of the providers that can take a
//! request now, keyed by rank (lower cost first), behind the model's own mutex.
//! Placing a request takes the first entry whose slot can still be claimed, so a
//! decision is O(log n) in the pool and never scans the fleet or takes a lock
//! shared by all models.
//!
//! A provider serving several models sits in several pools. After any change to its
//! slots or health it is re-ranked in each pool, one pool lock at a time. Each rank
//! carries the provider's generation counter, and a pool keeps the newest one, so
//! updates racing each other cannot leave a stale rank behind.
//!
//! When no provider is free, a request waits in its model's queue: a bounded count
//! of waiters woken in FIFO order by [`tokio::sync::Notify`] when a slot frees up.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use switchyard_shared::ids::{ModelId, ProviderId};
use tokio::sync::Notify;

use crate::provider::ProviderHandle;

/// Why no slot was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementError {
    /// No provider on this node serves the model.
    NoProviders,
    /// Every provider is busy and the model's queue is full.
    QueueFull,
    /// Every provider stayed busy for the whole queue timeout.
    QueueTimeout,
}

#[derive(Default)]
struct PoolEntries {
    ranked: BTreeSet<(u32, ProviderId)>,
    members: HashMap<ProviderId, Member>,
}

struct Member {
    handle: Arc<ProviderHandle>,
    /// Current position in `ranked`, if the provider can take a request.
    cost: Option<u32>,
    generation: u64,
}

#[derive(Default)]
struct ModelPool {
    entries: Mutex<PoolEntries>,
    slot_freed: Notify,
    waiting: AtomicUsize,
}

/// A claimed concurrency slot. Dropping it frees the slot and wakes a waiter.
pub struct SlotGuard {
    scheduler: Arc<Scheduler>,
    provider: Arc<ProviderHandle>,
}

impl SlotGuard {
    pub fn provider(&self) -> &Arc<ProviderHandle> {
        &self.provider
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.provider.release_slot();
        self.scheduler.refresh(&self.provider);
        self.scheduler.wake_waiters(&self.provider);
    }
}

/// Per-model provider pools and queues of one node.
pub struct Scheduler {
    pools: RwLock<HashMap<ModelId, Arc<ModelPool>>>,
    queue_capacity: usize,
}

impl Scheduler {
    pub fn new(queue_capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            pools: RwLock::new(HashMap::new()),
            queue_capacity,
        })
    }

    fn pool(&self, model: &ModelId) -> Option<Arc<ModelPool>> {
        read(&self.pools).get(model).cloned()
    }

    /// Adds a newly registered provider to the pools of its models.
    pub fn add(&self, provider: &Arc<ProviderHandle>) {
        for model in &provider.models {
            let pool = write(&self.pools).entry(model.clone()).or_default().clone();
            lock(&pool.entries).members.insert(
                provider.id,
                Member {
                    handle: provider.clone(),
                    cost: None,
                    generation: 0,
                },
            );
        }
        self.refresh(provider);
        self.wake_waiters(provider);
    }

    /// Removes a provider from every pool; its claimed slots stay with their guards.
    /// Waiters are woken so that they see a pool left without providers at once.
    pub fn remove(&self, provider: &ProviderHandle) {
        for model in &provider.models {
            let Some(pool) = self.pool(model) else {
                continue;
            };
            let mut entries = lock(&pool.entries);
            if let Some(member) = entries.members.remove(&provider.id)
                && let Some(cost) = member.cost
            {
                entries.ranked.remove(&(cost, provider.id));
            }
        }
        self.wake_waiters(provider);
    }

    /// Re-ranks a provider in each of its pools after its slots or health changed.
    pub fn refresh(&self, provider: &ProviderHandle) {
        for model in &provider.models {
            let Some(pool) = self.pool(model) else {
                continue;
            };
            // Read the rank inside the pool lock, so the newest generation wins.
            let rank = provider.rank();
            let mut entries = lock(&pool.entries);
            let entries = &mut *entries;
            let Some(member) = entries.members.get_mut(&provider.id) else {
                continue;
            };
            if rank.generation < member.generation {
                continue;
            }
            if let Some(old) = member.cost {
                entries.ranked.remove(&(old, provider.id));
            }
            if let Some(new) = rank.cost {
                entries.ranked.insert((new, provider.id));
            }
            member.cost = rank.cost;
            member.generation = rank.generation;
        }
    }

    /// Wakes every request waiting on the provider's models. All of them, not
    /// one: a waiter that excludes this provider could not use the slot and would
    /// swallow the wakeup. The queue bound keeps the herd small.
    fn wake_waiters(&self, provider: &ProviderHandle) {
        for model in &provider.models {
            if let Some(pool) = self.pool(model)
                && pool.waiting.load(Ordering::Acquire) > 0
            {
                pool.slot_freed.notify_waiters();
            }
        }
    }

    /// Whether any provider of the model could take a request now or after a
    /// wait in the queue: routable, busy or not. Stops at the first one found.
    pub fn has_routable(&self, model: &ModelId) -> bool {
        self.pool(model).is_some_and(|pool| {
            lock(&pool.entries)
                .members
                .values()
                .any(|member| member.handle.is_routable())
        })
    }

    /// Number of providers in a model's pool, free or busy.
    pub fn provider_count(&self, model: &ModelId) -> usize {
        self.pool(model)
            .map_or(0, |pool| lock(&pool.entries).members.len())
    }

    /// Claims a slot on the best provider for `model` right now, skipping `exclude`.
    pub fn try_place(
        self: &Arc<Self>,
        model: &ModelId,
        exclude: &[ProviderId],
    ) -> Result<SlotGuard, PlacementError> {
        let pool = self.pool(model).ok_or(PlacementError::NoProviders)?;
        self.try_place_in(&pool, exclude)
    }

    fn try_place_in(
        self: &Arc<Self>,
        pool: &ModelPool,
        exclude: &[ProviderId],
    ) -> Result<SlotGuard, PlacementError> {
        // Each failed claim re-ranks its provider out of the way, so a few tries
        // are enough; the bound only guards against a provider flapping.
        for _ in 0..8 {
            let candidate = {
                let entries = lock(&pool.entries);
                let eligible = entries.members.keys().any(|id| !exclude.contains(id));
                if !eligible {
                    return Err(PlacementError::NoProviders);
                }
                entries
                    .ranked
                    .iter()
                    .find(|(_, id)| !exclude.contains(id))
                    .and_then(|(_, id)| entries.members.get(id))
                    .map(|member| member.handle.clone())
            };

            let Some(provider) = candidate else {
                return Err(PlacementError::QueueFull);
            };
            let claimed = provider.try_acquire_slot();
            self.refresh(&provider);
            if claimed {
                return Ok(SlotGuard {
                    scheduler: self.clone(),
                    provider,
                });
            }
        }
        Err(PlacementError::QueueFull)
    }

    /// Claims a slot for `model`, waiting up to `queue_timeout` in the model's
    /// queue when every provider is busy.
    pub async fn place(
        self: &Arc<Self>,
        model: &ModelId,
        exclude: &[ProviderId],
        queue_timeout: Duration,
    ) -> Result<SlotGuard, PlacementError> {
        let pool = self.pool(model).ok_or(PlacementError::NoProviders)?;
        match self.try_place_in(&pool, exclude) {
            Err(PlacementError::QueueFull) => {}
            other => return other,
        }

        if pool.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue_capacity {
            pool.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(PlacementError::QueueFull);
        }
        let _waiting = WaitingGuard(&pool.waiting);

        let deadline = tokio::time::Instant::now() + queue_timeout;
        loop {
            let notified = pool.slot_freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            match self.try_place_in(&pool, exclude) {
                Err(PlacementError::QueueFull) => {}
                other => return other,
            }

            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(PlacementError::QueueTimeout);
            }
        }
    }

    /// Counts, per model, of providers and free slots; for readiness and metrics.
    pub fn model_capacity(&self) -> Vec<ModelCapacity> {
        let pools: Vec<(ModelId, Arc<ModelPool>)> = read(&self.pools)
            .iter()
            .map(|(model, pool)| (model.clone(), pool.clone()))
            .collect();

        pools
            .into_iter()
            .map(|(model, pool)| {
                let entries = lock(&pool.entries);
                let handles = entries.members.values().map(|member| &member.handle);
                ModelCapacity {
                    model,
                    providers: entries.members.len(),
                    total_slots: handles
                        .clone()
                        .map(|handle| handle.max_slots() as usize)
                        .sum(),
                    free_slots: handles
                        .clone()
                        .map(|handle| handle.free_slots() as usize)
                        .sum(),
                    queue_depth: pool.waiting.load(Ordering::Acquire),
                    decode_tokens_per_second: handles
                        .map(|handle| handle.decode_tps_estimate())
                        .sum(),
                }
            })
            .collect()
    }
}

/// Capacity of one model on this node.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelCapacity {
    pub model: ModelId,
    pub providers: usize,
    pub total_slots: usize,
    pub free_slots: usize,
    pub queue_depth: usize,
    /// Sum of the providers' decode speeds, tokens per second.
    pub decode_tokens_per_second: f64,
}

struct WaitingGuard<'a>(&'a AtomicUsize);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

// The locks below guard plain maps whose updates complete before the guard drops,
// so a poisoned lock still holds consistent data and is safe to recover.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests;
