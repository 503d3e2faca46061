//! A router's shared state.

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_shared::catalog::SharedCatalog;
use switchyard_shared::cluster::{ClusterBus, ClusterView, now_ms};
use switchyard_shared::ids::NodeId;
use switchyard_shared::ledger::Ledger;
use switchyard_shared::metrics::{CounterFamily, HttpMetrics};
use switchyard_shared::ring::Ring;
use tokio_util::sync::CancellationToken;

use crate::auth::KeyCache;
use crate::config::{NodeAddress, RouterConfig};
use crate::rate_limit::RateLimiter;

pub struct RouterState {
    pub config: RouterConfig,
    pub catalog: Arc<SharedCatalog>,
    pub ledger: Arc<dyn Ledger>,
    pub ring: Ring,
    pub nodes: HashMap<NodeId, NodeAddress>,
    pub http: reqwest::Client,
    pub keys: KeyCache,
    /// Cancelled when the router shuts down: it stops accepting connections.
    pub shutdown: CancellationToken,
    /// Cancelled once the responses in flight have finished or the drain
    /// deadline passed. Provider pipes close on it, so no stream loses its provider.
    pub close_providers: CancellationToken,
    /// Consumer responses being relayed.
    active_streams: Arc<std::sync::atomic::AtomicUsize>,
    pub http_metrics: Arc<HttpMetrics>,
    /// Requests sent on to another node because one could not take them.
    pub node_failovers: CounterFamily,
    pub limiter: RateLimiter,
    /// This router's id on the bus, new at each start.
    pub router_id: String,
    /// Failed Redis calls of the cluster view, by operation.
    pub redis_errors: CounterFamily,
    /// Live members and capacity, when a cluster bus is configured.
    pub bus: Option<Arc<dyn ClusterBus>>,
    pub view: ClusterView,
}

impl RouterState {
    pub fn new(
        config: RouterConfig,
        catalog: Arc<SharedCatalog>,
        ledger: Arc<dyn Ledger>,
    ) -> Arc<Self> {
        let ring = Ring::new(config.nodes.iter().map(|node| node.id.clone()));
        let nodes = config
            .nodes
            .iter()
            .map(|node| (node.id.clone(), node.clone()))
            .collect();
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(2))
            .tcp_nodelay(true)
            .build()
            .expect("an HTTP client without TLS settings always builds");
        let keys = KeyCache::new(config.key_cache_ttl, config.key_cache_capacity);
        let limiter = RateLimiter::new(
            config.redis_url.as_deref(),
            &config.redis_key_prefix,
            config.default_limits,
            config.routers,
        )
        .expect("the Redis URL was validated with the configuration");

        Arc::new(Self {
            config,
            catalog,
            ledger,
            ring,
            nodes,
            http,
            keys,
            shutdown: CancellationToken::new(),
            close_providers: CancellationToken::new(),
            active_streams: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            http_metrics: Arc::new(HttpMetrics::default()),
            node_failovers: CounterFamily::default(),
            limiter,
            router_id: uuid::Uuid::new_v4().simple().to_string(),
            redis_errors: CounterFamily::default(),
            bus: None,
            view: ClusterView::new(),
        })
    }

    /// Counts a relayed response until the returned guard drops.
    pub fn track_stream(&self) -> ActiveStream {
        self.active_streams
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        ActiveStream(self.active_streams.clone())
    }

    pub fn active_streams(&self) -> usize {
        self.active_streams
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Uses `bus` for live membership and capacity instead of the static list.
    pub fn with_bus(
        config: RouterConfig,
        catalog: Arc<SharedCatalog>,
        ledger: Arc<dyn Ledger>,
        bus: Arc<dyn ClusterBus>,
    ) -> Arc<Self> {
        let mut state =
            Arc::into_inner(Self::new(config, catalog, ledger)).expect("a new state has one owner");
        state.bus = Some(bus);
        Arc::new(state)
    }

    /// Whether routing uses the live view: a bus is configured and has shown at
    /// least one member. Until then the static node list is used.
    fn live(&self) -> bool {
        self.bus.is_some() && !self.view.members().is_empty()
    }

    /// Nodes to try for `model`, best first. With a live view: ring owners with
    /// free slots, other nodes with free slots for the model, nodes with its
    /// providers, then the owners (which queue). Without one: the static ring,
    /// owner first.
    pub fn candidates(&self, model: &str) -> Vec<NodeAddress> {
        if self.live() {
            let replicas = self
                .catalog
                .get(model)
                .map_or(1, |entry| entry.replicas as usize);
            return self
                .view
                .candidates(model, replicas, now_ms())
                .into_iter()
                .map(|record| NodeAddress {
                    id: record.node_id,
                    base_url: record.address,
                })
                .collect();
        }
        self.ring
            .ranked(model)
            .into_iter()
            .filter_map(|id| self.nodes.get(id).cloned())
            .collect()
    }

    /// The ring providers are placed on: the live one when there is a view.
    pub fn placement_ring(&self) -> Ring {
        if self.live() {
            self.view.ring()
        } else {
            self.ring.clone()
        }
    }

    /// The address of a node, from the live view or the static list.
    pub fn node_address(&self, node: &NodeId) -> Option<NodeAddress> {
        if let Some(record) = self.view.member(node) {
            return Some(NodeAddress {
                id: record.node_id,
                base_url: record.address,
            });
        }
        self.nodes.get(node).cloned()
    }
}

/// A relayed response in progress. Dropping it ends the count.
pub struct ActiveStream(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
