//! The `switchyard` command: one binary for every role.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use switchyard::dev::{DevCluster, DevOptions};
use switchyard::telemetry::{self, LogFormat};
use switchyard_coordinator::{NodeConfig, NodeState, TrustLevel};
use switchyard_router::{NodeAddress, RouterConfig, RouterState};
use switchyard_shared::catalog::Catalog;
use switchyard_shared::ids::{AccountId, NodeId};
use switchyard_shared::ledger::{Ledger, MemoryLedger, PgLedger};
use switchyard_shared::money::MicroUsd;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Sharded coordinator cluster for decentralized LLM inference"
)]
struct Cli {
    /// Log format; `pretty` for terminals, `json` for log collectors.
    #[arg(long, global = true, value_enum, env = "SWITCHYARD_LOG_FORMAT")]
    log_format: Option<LogFormat>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a router, coordinator nodes and simulated providers in one process.
    Dev(DevArgs),
    /// Run one coordinator node.
    Coordinator(CoordinatorArgs),
    /// Run one router.
    Router(RouterArgs),
    /// Generate load against a cluster.
    #[command(subcommand)]
    Loadtest(LoadtestCommand),
    /// Apply the ledger's database migrations.
    Migrate(MigrateArgs),
    /// Manage accounts, keys and provider tokens in the ledger database.
    Admin(AdminArgs),
}

#[derive(Args)]
struct AdminArgs {
    /// Postgres URL of the ledger.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an account with a zero balance.
    CreateAccount { id: String },
    /// Add money to an account, once per reference.
    Credit {
        id: String,
        /// Decimal US dollars, for example 12.50.
        #[arg(long)]
        usd: String,
        /// Idempotency reference: a second credit with the same one is ignored.
        #[arg(long)]
        reference: String,
    },
    /// Issue an API key; it is printed once and stored only as a hash.
    IssueKey {
        id: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Revoke the API key with this display prefix.
    RevokeKey { prefix: String },
    /// Issue a provider token that links a provider's earnings to the account.
    IssueProviderToken { id: String },
    /// Print an account's balance.
    Balance { id: String },
    /// Set an account's rate limits; without a flag the router default applies.
    SetLimits {
        id: String,
        /// Requests per minute; 0 is unlimited.
        #[arg(long)]
        requests_per_minute: Option<u32>,
        /// Estimated tokens per minute; 0 is unlimited.
        #[arg(long)]
        tokens_per_minute: Option<u32>,
    },
    /// Create or replace a model's prices; running roles pick it up within
    /// seconds.
    SetModel {
        id: String,
        /// Micro-USD per million prompt tokens.
        #[arg(long)]
        input_per_mtok: i64,
        /// Micro-USD per million completion tokens.
        #[arg(long)]
        output_per_mtok: i64,
        /// Smallest charge of a charged request, in micro-USD.
        #[arg(long, default_value_t = 0)]
        min_charge: i64,
        /// Completion limit of requests that set none.
        #[arg(long, default_value_t = 8192)]
        default_max_tokens: u32,
        /// Nodes that host the model's providers.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Keep the model in the catalog but serve no requests for it.
        #[arg(long)]
        disabled: bool,
    },
}

#[derive(Args)]
struct MigrateArgs {
    /// Postgres URL of the ledger.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
}

#[derive(Args)]
struct DevArgs {
    /// Address of the consumer API.
    #[arg(long, default_value = "127.0.0.1:8080", env = "SWITCHYARD_LISTEN")]
    listen: SocketAddr,
    /// API key of the dev account; generated when absent.
    #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Simulated providers to start.
    #[arg(long, default_value_t = 2)]
    providers: usize,
    /// Coordinator nodes to start.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Content chunks per second of each simulated provider; 0 is unlimited.
    #[arg(long, default_value_t = 20.0)]
    token_rate: f64,
    /// Balance of the dev account, in whole US dollars.
    #[arg(long, default_value_t = 100)]
    balance_usd: i64,
    /// Postgres URL of the ledger; the in-memory ledger when absent.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    #[command(flatten)]
    catalog: CatalogArgs,
}

#[derive(Args)]
struct CatalogArgs {
    /// Model catalog (JSON); the built-in catalog when absent.
    #[arg(long, env = "SWITCHYARD_CATALOG")]
    catalog: Option<PathBuf>,
}

impl CatalogArgs {
    fn load(&self) -> anyhow::Result<Catalog> {
        match &self.catalog {
            Some(path) => {
                Catalog::load(path).with_context(|| format!("invalid catalog {}", path.display()))
            }
            None => Ok(Catalog::builtin()),
        }
    }
}

/// Ledger settings of a standalone role.
#[derive(Args)]
struct LedgerArgs {
    /// Postgres URL of the shared ledger. Without it the role uses an in-memory
    /// ledger of its own, seeded with `--dev-api-key`.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// Most Postgres connections this process opens.
    #[arg(
        long,
        default_value_t = 16,
        env = "SWITCHYARD_DATABASE_MAX_CONNECTIONS"
    )]
    database_max_connections: u32,
    /// API key accepted by the in-memory ledger (ignored with a database).
    #[arg(long, env = "SWITCHYARD_DEV_API_KEY", hide_env_values = true)]
    dev_api_key: Option<String>,
    /// Balance of that key's account, in whole US dollars.
    #[arg(long, default_value_t = 100)]
    dev_balance_usd: i64,
}

impl LedgerArgs {
    /// Opens the shared ledger and checks its schema, or builds the in-memory one.
    ///
    /// NOTE: each process has its own in-memory ledger, so without a database
    /// balances are not shared between standalone routers and nodes.
    async fn open(&self) -> anyhow::Result<Arc<dyn Ledger>> {
        if let Some(url) = &self.database_url {
            let ledger = PgLedger::connect_lazy(url, self.database_max_connections)
                .context("invalid DATABASE_URL")?;
            ledger
                .check_schema()
                .await
                .context("the ledger database is not ready")?;
            return Ok(Arc::new(ledger));
        }

        let ledger = MemoryLedger::new();
        if let Some(key) = &self.dev_api_key {
            let account = AccountId::from("dev");
            ledger.create_account(&account).await?;
            ledger
                .credit(
                    &account,
                    MicroUsd::from_usd(self.dev_balance_usd),
                    "dev-seed",
                )
                .await?;
            ledger.add_api_key(&account, key, "dev").await?;
        }
        Ok(Arc::new(ledger))
    }
}

#[derive(Args)]
struct CoordinatorArgs {
    /// Address of the node's internal endpoint.
    #[arg(long, default_value = "127.0.0.1:9000", env = "SWITCHYARD_LISTEN")]
    listen: SocketAddr,
    /// Stable id of this node, for example `coordinator-0`.
    #[arg(long, env = "SWITCHYARD_NODE_ID")]
    node_id: String,
    /// Secret shared by routers and nodes.
    #[arg(long, env = "SWITCHYARD_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: String,
    /// Minimum provider trust for routing: none, self_signed or hardware.
    #[arg(long, default_value = "none", env = "SWITCHYARD_MIN_TRUST")]
    min_trust: TrustLevel,
    /// Redis of the cluster bus, where the node announces itself and its capacity.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Prefix of every Redis key of this cluster.
    #[arg(
        long,
        default_value = "switchyard:",
        env = "SWITCHYARD_REDIS_KEY_PREFIX"
    )]
    redis_key_prefix: String,
    /// Base URL routers use to reach this node; `http://<listen>` by default.
    #[arg(long, env = "SWITCHYARD_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Seconds a stopping node waits for its requests to finish and its
    /// providers to move before it closes what is left.
    #[arg(long, default_value_t = 30, env = "SWITCHYARD_DRAIN_TIMEOUT_SECS")]
    drain_timeout_secs: u64,
    /// Seconds without a heartbeat after which a provider is evicted.
    #[arg(long, default_value_t = 90, env = "SWITCHYARD_HEARTBEAT_TIMEOUT_SECS")]
    heartbeat_timeout_secs: u64,
    #[command(flatten)]
    catalog: CatalogArgs,
    #[command(flatten)]
    ledger: LedgerArgs,
}

#[derive(Args)]
struct RouterArgs {
    /// Address of the consumer API and provider socket.
    #[arg(long, default_value = "127.0.0.1:8080", env = "SWITCHYARD_LISTEN")]
    listen: SocketAddr,
    /// A coordinator node as ID=URL; repeat for each node.
    #[arg(long = "node", required = true, value_parser = NodeAddress::parse)]
    nodes: Vec<NodeAddress>,
    /// Secret shared by routers and nodes.
    #[arg(long, env = "SWITCHYARD_CLUSTER_TOKEN", hide_env_values = true)]
    cluster_token: String,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 10 * 1024 * 1024, env = "SWITCHYARD_MAX_BODY_BYTES")]
    max_body_bytes: usize,
    /// Bearer token of the admin endpoints; they are disabled without one.
    #[arg(long, env = "SWITCHYARD_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Redis that holds the rate limits shared by all routers.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Prefix of every Redis key of this cluster.
    #[arg(
        long,
        default_value = "switchyard:",
        env = "SWITCHYARD_REDIS_KEY_PREFIX"
    )]
    redis_key_prefix: String,
    /// Requests per minute of an account that sets no limit; 0 is unlimited.
    #[arg(
        long,
        default_value_t = 600,
        env = "SWITCHYARD_DEFAULT_REQUESTS_PER_MINUTE"
    )]
    default_requests_per_minute: u32,
    /// Estimated tokens per minute of an account that sets no limit; 0 is unlimited.
    #[arg(
        long,
        default_value_t = 2_000_000,
        env = "SWITCHYARD_DEFAULT_TOKENS_PER_MINUTE"
    )]
    default_tokens_per_minute: u32,
    /// Routers in the cluster; when Redis is unreachable each allows this share.
    #[arg(long, default_value_t = 1, env = "SWITCHYARD_ROUTERS")]
    routers: u32,
    #[command(flatten)]
    catalog: CatalogArgs,
    #[command(flatten)]
    ledger: LedgerArgs,
}

#[derive(Subcommand)]
enum LoadtestCommand {
    /// Run a fleet of simulated providers against a router.
    Provider(ProviderArgs),
    /// Measure hold-and-settle throughput of the Postgres ledger.
    Ledger(LedgerBenchArgs),
}

#[derive(Args)]
struct LedgerBenchArgs {
    /// Postgres URL of a migrated ledger; the run adds its own accounts.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Requests to hold and settle.
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Concurrent workers.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Consumer accounts (and provider accounts) to spread the requests over.
    #[arg(long, default_value_t = 64)]
    accounts: usize,
    /// Postgres connections in the pool.
    #[arg(long, default_value_t = 32)]
    connections: u32,
}

#[derive(Args)]
struct ProviderArgs {
    /// Router base URL, for example `http://127.0.0.1:8080` (or a `ws://` URL).
    #[arg(long)]
    router: String,
    /// Model the providers serve; repeat for several.
    #[arg(long = "model", required = true)]
    models: Vec<String>,
    /// Number of simulated providers.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Content chunks per second per request; 0 is unlimited.
    #[arg(long, default_value_t = 0.0)]
    token_rate: f64,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 5)]
    heartbeat_secs: u64,
    /// Provider token linking earnings to an account.
    #[arg(long, env = "SWITCHYARD_PROVIDER_TOKEN", hide_env_values = true)]
    auth_token: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default_format = match cli.command {
        Command::Dev(_) | Command::Loadtest(_) | Command::Migrate(_) | Command::Admin(_) => {
            LogFormat::Pretty
        }
        Command::Coordinator(_) | Command::Router(_) => LogFormat::Json,
    };
    telemetry::init(cli.log_format.unwrap_or(default_format));

    match cli.command {
        Command::Dev(args) => run_dev(args).await,
        Command::Coordinator(args) => run_coordinator(args).await,
        Command::Router(args) => run_router(args).await,
        Command::Loadtest(LoadtestCommand::Provider(args)) => run_providers(args).await,
        Command::Loadtest(LoadtestCommand::Ledger(args)) => run_ledger_bench(args).await,
        Command::Migrate(args) => run_migrate(args).await,
        Command::Admin(args) => run_admin(args).await,
    }
}

/// Returns a token cancelled on the first SIGINT or SIGTERM.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        info!("shutdown signal received");
        cancel.cancel();
        wait_for_signal().await;
        info!("second shutdown signal received; exiting at once");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run_ledger_bench(args: LedgerBenchArgs) -> anyhow::Result<()> {
    let ledger = PgLedger::connect_lazy(&args.database_url, args.connections)
        .context("invalid DATABASE_URL")?;
    ledger
        .check_schema()
        .await
        .context("the ledger database is not ready")?;
    let run_id = format!("bench-{}", &uuid_like());
    let config = switchyard_loadtest::ledger_bench::LedgerBenchConfig {
        requests: args.requests,
        concurrency: args.concurrency,
        accounts: args.accounts,
        run_id,
    };
    let report = switchyard_loadtest::ledger_bench::run(Arc::new(ledger), config).await?;

    println!("settlements:         {}", report.requests);
    println!("elapsed:             {:.2} s", report.elapsed.as_secs_f64());
    println!("settlements/s:       {:.0}", report.settlements_per_second);
    println!(
        "hold p50 / p99:      {:?} / {:?}",
        report.hold_p50, report.hold_p99
    );
    println!(
        "settle p50 / p99:    {:?} / {:?}",
        report.settle_p50, report.settle_p99
    );
    println!(
        "usage rows:          {} ({})",
        report.usage_rows,
        if report.usage_rows == report.requests {
            "each settled exactly once"
        } else {
            "MISMATCH"
        }
    );
    anyhow::ensure!(
        report.usage_rows == report.requests,
        "{} usage rows for {} settlements",
        report.usage_rows,
        report.requests
    );
    Ok(())
}

/// Returns a short random hex id for a benchmark run.
fn uuid_like() -> String {
    let mut bytes = [0u8; 6];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    hex::encode(bytes)
}

async fn run_migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let ledger = PgLedger::connect_lazy(&args.database_url, 2).context("invalid DATABASE_URL")?;
    ledger.migrate().await.context("migration failed")?;
    info!("ledger schema is up to date");
    Ok(())
}

async fn run_admin(args: AdminArgs) -> anyhow::Result<()> {
    let ledger = PgLedger::connect_lazy(&args.database_url, 2).context("invalid DATABASE_URL")?;
    ledger
        .check_schema()
        .await
        .context("the ledger database is not ready")?;

    match args.command {
        AdminCommand::CreateAccount { id } => {
            ledger.create_account(&AccountId::new(&id)).await?;
            println!("account {id} is ready (an existing account is left unchanged)");
        }
        AdminCommand::Credit { id, usd, reference } => {
            let amount =
                MicroUsd::parse_usd(&usd).with_context(|| format!("invalid --usd `{usd}`"))?;
            let balance = ledger
                .credit(&AccountId::new(&id), amount, &format!("admin:{reference}"))
                .await?;
            println!(
                "account {id}: balance {} USD, available {} USD",
                balance.balance,
                balance.available()
            );
        }
        AdminCommand::IssueKey { id, name } => {
            let issued = ledger.issue_api_key(&AccountId::new(&id), &name).await?;
            println!("{}", issued.secret);
            eprintln!(
                "Store this key now: it is not shown again. Prefix: {}",
                issued.display_prefix
            );
        }
        AdminCommand::RevokeKey { prefix } => {
            ledger.revoke_api_key(&prefix).await?;
            println!("revoked the API key with prefix {prefix}");
        }
        AdminCommand::IssueProviderToken { id } => {
            let issued = ledger.issue_provider_token(&AccountId::new(&id)).await?;
            println!("{}", issued.secret);
            eprintln!(
                "Store this token now: it is not shown again. Prefix: {}",
                issued.display_prefix
            );
        }
        AdminCommand::SetModel {
            id,
            input_per_mtok,
            output_per_mtok,
            min_charge,
            default_max_tokens,
            replicas,
            disabled,
        } => {
            let entry = switchyard_shared::catalog::ModelEntry {
                id: switchyard_shared::ids::ModelId::new(&id),
                input_per_mtok,
                output_per_mtok,
                min_charge,
                default_max_tokens,
                replicas,
                enabled: !disabled,
                weight_hash: None,
            };
            switchyard_shared::catalog::validate_entry(&entry)?;
            // A first model in an empty table would become the whole catalog.
            anyhow::ensure!(
                !ledger.list_models().await?.is_empty(),
                "the model table is empty; start a router or node once so it seeds the table from its catalog"
            );
            ledger.upsert_model(&entry).await?;
            println!("model {id} set");
        }
        AdminCommand::SetLimits {
            id,
            requests_per_minute,
            tokens_per_minute,
        } => {
            let limits = switchyard_shared::ledger::RateLimits {
                requests_per_minute,
                tokens_per_minute,
            };
            ledger.set_rate_limits(&AccountId::new(&id), limits).await?;
            println!("account {id}: rate limits set");
        }
        AdminCommand::Balance { id } => {
            let balance = ledger.balance(&AccountId::new(&id)).await?;
            println!(
                "account {id}: balance {} USD, held {} USD, available {} USD",
                balance.balance,
                balance.held,
                balance.available()
            );
        }
    }
    Ok(())
}

async fn run_dev(args: DevArgs) -> anyhow::Result<()> {
    let options = DevOptions {
        listen: args.listen,
        api_key: args.api_key,
        nodes: args.nodes,
        providers: args.providers,
        balance: MicroUsd::from_usd(args.balance_usd),
        catalog: args.catalog.load()?,
        token_rate: args.token_rate,
        database_url: args.database_url,
        ..DevOptions::default()
    };
    let model = options
        .catalog
        .enabled()
        .next()
        .map(|entry| entry.id.to_string())
        .context("the catalog has no enabled model")?;
    let cluster = DevCluster::start(options).await?;

    println!();
    println!("Switchyard dev cluster is running.");
    println!("  base URL: {}", cluster.base_url);
    println!("  API key:  {}", cluster.api_key);
    println!();
    println!("Try it:");
    println!(
        "  curl -N {}/chat/completions -H 'Authorization: Bearer {}' -H 'Content-Type: application/json' \\\n    -d '{{\"model\":\"{model}\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'",
        cluster.base_url, cluster.api_key
    );
    println!();

    shutdown_on_signal().cancelled().await;
    cluster.shutdown().await;
    Ok(())
}

async fn run_coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let mut config = NodeConfig::new(NodeId::new(args.node_id), args.cluster_token);
    config.min_trust = args.min_trust;
    config.heartbeat_timeout = Duration::from_secs(args.heartbeat_timeout_secs.max(1));
    config.advertise_url = args.advertise_url.clone();

    let ledger = args.ledger.open().await?;
    let shutdown = shutdown_on_signal();
    let catalog =
        switchyard::dev::start_catalog(ledger.clone(), args.catalog.load()?, &shutdown).await;
    let bus: Option<Arc<dyn switchyard_shared::cluster::ClusterBus>> = match &args.redis_url {
        Some(url) => Some(Arc::new(
            switchyard_shared::cluster::RedisBus::new(url, &args.redis_key_prefix)
                .context("invalid --redis-url")?,
        )),
        None => None,
    };
    let state = NodeState::new(config, catalog, ledger, bus);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to bind {}", args.listen))?;

    // The first signal drains: new work goes elsewhere, providers move to other
    // nodes, requests in flight finish. A second signal exits at once.
    let draining = state.clone();
    let drain_deadline = Duration::from_secs(args.drain_timeout_secs);
    tokio::spawn(async move {
        shutdown.cancelled().await;
        switchyard_coordinator::node::drain_and_stop(draining, drain_deadline).await;
    });
    switchyard_coordinator::serve(listener, state).await?;
    Ok(())
}

async fn run_router(args: RouterArgs) -> anyhow::Result<()> {
    let mut config = RouterConfig::new(args.nodes, args.cluster_token);
    config.max_body_bytes = args.max_body_bytes;
    config.admin_token = args.admin_token;
    config.redis_url = args.redis_url;
    config.redis_key_prefix = args.redis_key_prefix;
    config.default_limits = switchyard_router::rate_limit::DefaultLimits {
        requests_per_minute: args.default_requests_per_minute,
        tokens_per_minute: args.default_tokens_per_minute,
    };
    config.routers = args.routers;
    switchyard_router::rate_limit::RateLimiter::check_url(config.redis_url.as_deref())
        .map_err(anyhow::Error::msg)?;

    let ledger = args.ledger.open().await?;
    let shutdown = shutdown_on_signal();
    let catalog =
        switchyard::dev::start_catalog(ledger.clone(), args.catalog.load()?, &shutdown).await;
    let state = match config.redis_url.clone() {
        Some(url) => {
            let bus = switchyard_shared::cluster::RedisBus::new(&url, &config.redis_key_prefix)
                .context("invalid --redis-url")?;
            RouterState::with_bus(config, catalog, ledger, Arc::new(bus))
        }
        None => RouterState::new(config, catalog, ledger),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to bind {}", args.listen))?;

    let router_shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        router_shutdown.cancel();
    });
    switchyard_router::serve(listener, state).await?;
    Ok(())
}

async fn run_providers(args: ProviderArgs) -> anyhow::Result<()> {
    let mut command = switchyard_loadtest::ProviderCommandArgs::new(args.router, args.models);
    command.count = args.count;
    command.token_rate = args.token_rate;
    command.heartbeat_secs = args.heartbeat_secs;
    command.auth_token = args.auth_token;

    switchyard_loadtest::run_provider_command(command, shutdown_on_signal()).await?;
    Ok(())
}
