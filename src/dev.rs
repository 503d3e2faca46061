//! The embedded development cluster: one router, several coordinator nodes on
//! loopback ports, an in-memory ledger, and simulated providers, all in one
//! process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use switchyard_coordinator::{NodeConfig, NodeState};
use switchyard_loadtest::sim::{SimProvider, SimProviderConfig};
use switchyard_router::{NodeAddress, RouterConfig, RouterState};
use switchyard_shared::catalog::{Catalog, SharedCatalog};
use switchyard_shared::cluster::{ClusterBus, InProcessBus, RedisBus};
use switchyard_shared::ids::{AccountId, NodeId};
use switchyard_shared::ledger::{
    Ledger, MemoryLedger, PgLedger, SecretHash, generate_secret, spawn_catalog_refresh,
    sync_catalog,
};
use switchyard_shared::money::MicroUsd;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// Settings of a development cluster.
#[derive(Clone, Debug)]
pub struct DevOptions {
    /// Router address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// API key of the dev account; a fresh one is generated when `None`.
    pub api_key: Option<String>,
    pub nodes: usize,
    pub providers: usize,
    /// Balance given to the dev account.
    pub balance: MicroUsd,
    pub catalog: Catalog,
    /// Content chunks per second of each simulated provider; zero means unlimited.
    pub token_rate: f64,
    /// Completion tokens each simulated provider produces per answer, at most.
    pub completion_tokens: u64,
    /// Node settings applied to every node (ids and tokens are filled in).
    pub node_template: Option<NodeConfig>,
    /// Largest request body the router accepts, in bytes.
    pub max_body_bytes: usize,
    /// Postgres URL of the ledger; the in-memory ledger when `None`. The schema is
    /// migrated at start, since this is a development cluster.
    pub database_url: Option<String>,
    /// Token of the router's admin endpoints; they are disabled when `None`.
    pub admin_token: Option<String>,
    /// Redis of the shared rate limits; the router limits on its own when `None`.
    pub redis_url: Option<String>,
    /// Prefix of the Redis keys, so clusters can share one Redis.
    pub redis_key_prefix: String,
    /// Rate limits of accounts that set none (zero is unlimited).
    pub default_limits: switchyard_router::rate_limit::DefaultLimits,
}

impl Default for DevOptions {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            nodes: 3,
            providers: 2,
            balance: MicroUsd::from_usd(100),
            catalog: Catalog::builtin(),
            token_rate: 0.0,
            completion_tokens: 16,
            node_template: None,
            max_body_bytes: 10 * 1024 * 1024,
            database_url: None,
            admin_token: None,
            redis_url: None,
            redis_key_prefix: "switchyard:".to_owned(),
            default_limits: switchyard_router::rate_limit::DefaultLimits {
                requests_per_minute: 0,
                tokens_per_minute: 0,
            },
        }
    }
}

/// A running development cluster. Dropping it does not stop it; call
/// [`DevCluster::shutdown`].
pub struct DevCluster {
    /// Base URL of the consumer API, for example `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    pub router_address: SocketAddr,
    pub api_key: String,
    /// The consumer account that `api_key` belongs to.
    pub account: AccountId,
    /// The account credited with the simulated providers' earnings.
    pub provider_account: AccountId,
    /// Provider token linked to `provider_account`.
    pub provider_token: String,
    pub ledger: Arc<dyn Ledger>,
    pub nodes: Vec<Arc<NodeState>>,
    pub router: Arc<RouterState>,
    pub providers: Vec<SimProvider>,
    /// The bus the nodes announce themselves on.
    pub bus: Arc<dyn ClusterBus>,
    shutdown: CancellationToken,
    servers: JoinSet<std::io::Result<()>>,
}

impl DevCluster {
    /// Starts the nodes, the router and the simulated providers, and waits until
    /// every provider has registered.
    pub async fn start(options: DevOptions) -> anyhow::Result<Self> {
        let shutdown = CancellationToken::new();
        let cluster_token = generate_secret("sy_cluster_");
        let ledger = open_ledger(options.database_url.as_deref()).await?;

        let account = AccountId::from("dev");
        let api_key = options
            .api_key
            .clone()
            .unwrap_or_else(|| generate_secret(switchyard_shared::ledger::API_KEY_PREFIX));
        ledger.create_account(&account).await?;
        ledger
            .credit(
                &account,
                options.balance,
                &format!("dev-seed:{}", SecretHash::of(&api_key).to_hex()),
            )
            .await?;
        ledger.add_api_key(&account, &api_key, "dev").await?;

        let provider_account = AccountId::from("dev-provider");
        ledger.create_account(&provider_account).await?;
        let provider_token = ledger.issue_provider_token(&provider_account).await?.secret;
        let shared_ledger = ledger.clone();

        let catalog =
            start_catalog(shared_ledger.clone(), options.catalog.clone(), &shutdown).await;
        let bus = open_bus(&options)?;

        let mut servers = JoinSet::new();
        let mut nodes = Vec::new();
        let mut addresses = Vec::new();
        for index in 0..options.nodes.max(1) {
            let node_id = NodeId::new(format!("coordinator-{index}"));
            let mut config = options
                .node_template
                .clone()
                .unwrap_or_else(|| NodeConfig::new(node_id.clone(), String::new()));
            config.node_id = node_id.clone();
            config.cluster_token = cluster_token.clone();

            let listener = TcpListener::bind(("127.0.0.1", 0))
                .await
                .context("failed to bind a coordinator node port on 127.0.0.1")?;
            let address = listener.local_addr()?;
            let state = NodeState::new(
                config,
                catalog.clone(),
                shared_ledger.clone(),
                Some(bus.clone()),
            );
            let node_shutdown = state.shutdown.clone();
            let root = shutdown.clone();
            tokio::spawn(async move {
                root.cancelled().await;
                node_shutdown.cancel();
            });
            servers.spawn(switchyard_coordinator::serve(listener, state.clone()));
            nodes.push(state);
            addresses.push(NodeAddress {
                id: node_id,
                base_url: format!("http://{address}"),
            });
        }

        let listener = TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("failed to bind the router to {}", options.listen))?;
        let router_address = listener.local_addr()?;
        let mut router_config = RouterConfig::new(addresses, cluster_token);
        router_config.max_body_bytes = options.max_body_bytes;
        router_config.admin_token = options.admin_token.clone();
        router_config.redis_url = options.redis_url.clone();
        router_config.redis_key_prefix = options.redis_key_prefix.clone();
        router_config.default_limits = options.default_limits;
        let router =
            RouterState::with_bus(router_config, catalog.clone(), shared_ledger, bus.clone());
        let router_shutdown = router.shutdown.clone();
        let root = shutdown.clone();
        tokio::spawn(async move {
            root.cancelled().await;
            router_shutdown.cancel();
        });
        servers.spawn(switchyard_router::serve(listener, router.clone()));
        // Providers are placed on the router's ring, so the router must see every
        // node first; a partial view would place some on the wrong node.
        wait_for_view(&router, nodes.len()).await?;

        let providers = spawn_providers(&options, router_address, &provider_token, &shutdown);
        let cluster = Self {
            base_url: format!("http://{router_address}/v1"),
            router_address,
            api_key,
            account,
            provider_account,
            provider_token,
            ledger,
            nodes,
            router,
            providers,
            bus,
            shutdown,
            servers,
        };
        cluster
            .wait_for_providers(options.providers, Duration::from_secs(30))
            .await?;
        info!(base_url = %cluster.base_url, providers = options.providers, "dev cluster ready");
        Ok(cluster)
    }

    /// Waits until the nodes hold `count` provider sessions in all.
    pub async fn wait_for_providers(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let registered: usize = self.nodes.iter().map(|node| node.provider_count()).sum();
            if registered >= count {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "only {registered} of {count} simulated providers registered within {timeout:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The URL providers connect to.
    pub fn provider_url(&self) -> String {
        format!("ws://{}/ws/provider", self.router_address)
    }

    /// Stops providers, router and nodes, and waits for the servers to exit.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        for provider in self.providers.drain(..) {
            provider.stop().await;
        }
        while self.servers.join_next().await.is_some() {}
    }
}

/// Waits until `router` sees `count` members on the bus.
async fn wait_for_view(router: &RouterState, count: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while router.view.members().len() < count {
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "the router saw {} of {count} nodes within 10 s",
                router.view.members().len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// How often roles reload the model catalog from the ledger.
pub const CATALOG_REFRESH: Duration = Duration::from_secs(5);

/// Loads the model catalog from the ledger (seeding the ledger's model table from
/// `seed` when it is empty) and keeps reloading it until `shutdown`. If the
/// ledger cannot be read at start, the role starts with `seed`.
pub async fn start_catalog(
    ledger: Arc<dyn Ledger>,
    seed: Catalog,
    shutdown: &CancellationToken,
) -> Arc<SharedCatalog> {
    let catalog = Arc::new(SharedCatalog::new(seed.clone()));
    if let Err(error) = sync_catalog(ledger.as_ref(), &seed, &catalog).await {
        tracing::warn!(error = %error, "failed to load the model catalog from the ledger; using the configured one");
    }
    spawn_catalog_refresh(
        ledger,
        seed,
        catalog.clone(),
        CATALOG_REFRESH,
        shutdown.child_token(),
    );
    catalog
}

/// Opens the cluster bus: Redis when the options name one, else in-process.
fn open_bus(options: &DevOptions) -> anyhow::Result<Arc<dyn ClusterBus>> {
    Ok(match &options.redis_url {
        Some(url) => {
            Arc::new(RedisBus::new(url, &options.redis_key_prefix).context("invalid Redis URL")?)
        }
        None => Arc::new(InProcessBus::new()),
    })
}

/// Opens the Postgres ledger at `url` and migrates it, or makes an in-memory one.
async fn open_ledger(url: Option<&str>) -> anyhow::Result<Arc<dyn Ledger>> {
    let Some(url) = url else {
        return Ok(Arc::new(MemoryLedger::new()));
    };
    let ledger = PgLedger::connect_lazy(url, 16).context("invalid DATABASE_URL")?;
    ledger
        .migrate()
        .await
        .context("failed to migrate the ledger database")?;
    info!("using the Postgres ledger");
    Ok(Arc::new(ledger))
}

/// Starts the simulated providers. Each serves every enabled catalog model, with a
/// different primary model, so providers spread over the nodes and every model
/// has someone to serve it.
fn spawn_providers(
    options: &DevOptions,
    router_address: SocketAddr,
    provider_token: &str,
    shutdown: &CancellationToken,
) -> Vec<SimProvider> {
    let models: Vec<String> = options
        .catalog
        .enabled()
        .map(|entry| entry.id.to_string())
        .collect();
    let url = format!("ws://{router_address}/ws/provider");

    (0..options.providers)
        .map(|index| {
            let mut rotated = models.clone();
            if !rotated.is_empty() {
                rotated.rotate_left(index % models.len());
            }
            let mut config = SimProviderConfig::new(url.clone(), rotated);
            config.name = format!("sim-provider-{index}");
            config.auth_token = Some(provider_token.to_owned());
            config.token_rate = options.token_rate;
            config.completion_tokens = options.completion_tokens;
            SimProvider::spawn_with_shutdown(config, shutdown)
        })
        .collect()
}
