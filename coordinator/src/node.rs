//! A coordinator node's shared state and its lifecycle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use switchyard_shared::catalog::SharedCatalog;
use switchyard_shared::cluster::ClusterBus;
use switchyard_shared::ids::{NodeId, ProviderId};
use switchyard_shared::ledger::Ledger;
use switchyard_shared::metrics::{CounterFamily, HttpMetrics};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::NodeConfig;
use crate::provider::ProviderHandle;
use crate::scheduler::Scheduler;

/// Everything a node's handlers and sessions share.
pub struct NodeState {
    pub config: NodeConfig,
    pub catalog: Arc<SharedCatalog>,
    pub ledger: Arc<dyn Ledger>,
    pub scheduler: Arc<Scheduler>,
    providers: RwLock<HashMap<ProviderId, Arc<ProviderHandle>>>,
    /// Cancelled when the node shuts down; every session and request holds a child.
    pub shutdown: CancellationToken,
    /// Every request task, so shutdown can wait for them.
    pub tasks: TaskTracker,
    pub metrics: NodeMetrics,
    /// The bus the node announces itself and its capacity on. `None` for a node
    /// outside any cluster bus, which routers then need in their node list.
    pub bus: Option<Arc<dyn ClusterBus>>,
    /// Set when the node drains: it takes no new requests, announces itself as
    /// draining and moves its providers away.
    draining: AtomicBool,
    /// Consumer requests being served.
    active_requests: AtomicUsize,
}

/// Counters of a node; gauges are computed when `/metrics` is scraped.
#[derive(Default)]
pub struct NodeMetrics {
    pub http: Arc<HttpMetrics>,
    /// Consumer requests by how they ended.
    pub requests: CounterFamily,
    /// Dispatch attempts that failed before the first content chunk, by reason.
    pub attempt_failures: CounterFamily,
    /// Ledger calls that failed, by operation.
    pub ledger_errors: CounterFamily,
    /// Provider sockets closed so the provider moves to its new home.
    pub rehomes: CounterFamily,
    /// Failed calls to the cluster bus.
    pub redis_errors: CounterFamily,
}

impl NodeState {
    pub fn new(
        config: NodeConfig,
        catalog: Arc<SharedCatalog>,
        ledger: Arc<dyn Ledger>,
        bus: Option<Arc<dyn ClusterBus>>,
    ) -> Arc<Self> {
        let scheduler = Scheduler::new(config.queue_capacity);
        Arc::new(Self {
            config,
            catalog,
            ledger,
            scheduler,
            providers: RwLock::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            metrics: NodeMetrics::default(),
            bus,
            draining: AtomicBool::new(false),
            active_requests: AtomicUsize::new(0),
        })
    }

    pub fn add_provider(&self, provider: &Arc<ProviderHandle>) {
        write(&self.providers).insert(provider.id, provider.clone());
        self.scheduler.add(provider);
    }

    pub fn remove_provider(&self, provider: &ProviderHandle) {
        write(&self.providers).remove(&provider.id);
        self.scheduler.remove(provider);
    }

    /// Re-ranks a provider after its heartbeat or trust state changed.
    pub fn refresh_provider(&self, provider: &ProviderHandle) {
        self.scheduler.refresh(provider);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Counts a consumer request until the returned guard drops.
    pub fn track_request(self: &Arc<Self>) -> ActiveRequest {
        self.active_requests.fetch_add(1, Ordering::AcqRel);
        ActiveRequest(self.clone())
    }

    pub fn active_requests(&self) -> usize {
        self.active_requests.load(Ordering::Acquire)
    }

    pub fn provider_count(&self) -> usize {
        read(&self.providers).len()
    }

    pub fn providers(&self) -> Vec<Arc<ProviderHandle>> {
        read(&self.providers).values().cloned().collect()
    }
}

/// A consumer request in progress; dropping it ends the count.
pub struct ActiveRequest(Arc<NodeState>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Drains the node, then stops it: it stops taking requests, announces itself as
/// draining (so routers send nothing new and its providers re-home), and waits
/// until its requests have finished and its providers have left, or until
/// `deadline`. Then it cancels `shutdown`, which closes what is left and leaves
/// the member set.
pub async fn drain_and_stop(state: Arc<NodeState>, deadline: std::time::Duration) {
    state.draining.store(true, Ordering::Release);
    info!(node.id = %state.config.node_id, deadline_secs = deadline.as_secs(), "draining");

    let until = tokio::time::Instant::now() + deadline;
    loop {
        let providers_left = state.bus.is_none() || state.provider_count() == 0;
        if state.active_requests() == 0 && providers_left {
            break;
        }
        if tokio::time::Instant::now() >= until {
            warn!(
                requests = state.active_requests(),
                providers = state.provider_count(),
                "drain deadline passed; stopping with work left"
            );
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    state.shutdown.cancel();
}

/// Serves the node's internal HTTP and WebSocket endpoints on `listener` until
/// `state.shutdown` is cancelled, then waits for request tasks to finish.
pub async fn serve(listener: TcpListener, state: Arc<NodeState>) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    info!(node.id = %state.config.node_id, %address, "coordinator node listening");

    let advertised = state
        .config
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{address}"));
    state
        .tasks
        .spawn(crate::membership::run(state.clone(), advertised));
    state.tasks.spawn(crate::rehome::run(state.clone()));

    if !state.config.sweep_interval.is_zero() {
        state.tasks.spawn(sweep_stale_holds(state.clone()));
    }

    let shutdown = state.shutdown.clone();
    let app = crate::http::app(state.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;

    state.tasks.close();
    state.tasks.wait().await;
    info!(node.id = %state.config.node_id, "coordinator node stopped");
    Ok(())
}

/// A hold of a node that is no longer a member is released once it is this old,
/// which covers a node that left while its last settlements were still retrying.
const ORPHAN_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Releases, every `sweep_interval`, the holds that dead nodes left open: at once
/// (after a grace period) for nodes that left the member set, and after the hold
/// timeout for any node. The ledger lets one node sweep stale holds at a time.
async fn sweep_stale_holds(state: Arc<NodeState>) {
    let mut ticks = tokio::time::interval(state.config.sweep_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        release_orphaned_holds(&state).await;
        match state
            .ledger
            .release_stale_holds(state.config.hold_timeout)
            .await
        {
            Ok(0) => {}
            Ok(released) => info!(released, "released stale holds"),
            Err(error) => {
                state
                    .metrics
                    .ledger_errors
                    .increment(&[("operation", "sweep")]);
                warn!(error = %error, "sweeping stale holds failed");
            }
        }
    }
}

/// Releases the holds of nodes that are no longer members. Skipped while the bus
/// is unreachable or shows no member, since every node would then look dead.
async fn release_orphaned_holds(state: &NodeState) {
    let Some(bus) = &state.bus else {
        return;
    };
    let members = match bus.members().await {
        Ok(members) if !members.is_empty() => members,
        _ => return,
    };
    let live: Vec<NodeId> = members.into_iter().map(|member| member.node_id).collect();
    match state
        .ledger
        .release_orphaned_holds(&live, ORPHAN_GRACE)
        .await
    {
        Ok(0) => {}
        Ok(released) => info!(
            released,
            "released the holds of nodes that left the cluster"
        ),
        Err(error) => {
            state
                .metrics
                .ledger_errors
                .increment(&[("operation", "sweep")]);
            warn!(error = %error, "releasing the holds of departed nodes failed");
        }
    }
}

// Both maps are updated by single inserts and removes, so a poisoned lock still
// holds consistent data.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
