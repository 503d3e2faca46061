//! A router's shared state.

use std::collections::HashMap;
use std::sync::Arc;

use switchyard_shared::catalog::SharedCatalog;
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
    /// Cancelled when the router shuts down; provider pipes close on it.
    pub shutdown: CancellationToken,
    pub http_metrics: Arc<HttpMetrics>,
    /// Requests sent on to another node because one could not take them.
    pub node_failovers: CounterFamily,
    pub limiter: RateLimiter,
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
            http_metrics: Arc::new(HttpMetrics::default()),
            node_failovers: CounterFamily::default(),
            limiter,
        })
    }

    /// Nodes to try for `model`, best first: the model's owners, then the rest of
    /// the ring in preference order.
    pub fn candidates(&self, model: &str) -> Vec<&NodeAddress> {
        self.ring
            .ranked(model)
            .into_iter()
            .filter_map(|id| self.nodes.get(id))
            .collect()
    }
}
