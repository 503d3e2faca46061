//! Whole clusters of real processes: three coordinator nodes and two routers of
//! the `switchyard` binary, sharing Postgres and a Redis server of the test's
//! own, with simulated providers. Covers a node added, a node killed with
//! `kill -9`, a rate limit shared by both routers, and Redis restarted under
//! load.

#![allow(
    clippy::unwrap_used,
    reason = "a test fails loudly on any unexpected error"
)]

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use switchyard_loadtest::sim::{SimProvider, SimProviderConfig};
use switchyard_shared::ids::AccountId;
use switchyard_shared::ledger::Ledger as _;
use switchyard_shared::ledger::test_db::TestDatabase;
use switchyard_shared::money::MicroUsd;

const BINARY: &str = env!("CARGO_BIN_EXE_switchyard");
const CLUSTER_TOKEN: &str = "multi-process-cluster-token";
/// Simulated providers, each with a primary model of its own.
const PROVIDERS: usize = 24;

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process that is killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Process {
    let mut command = Command::new(BINARY);
    command
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (key, value) in envs {
        command.env(key, value);
    }
    Process(command.spawn().unwrap())
}

/// A Redis server of this test's own, so the test can stop and restart it.
struct PrivateRedis {
    port: u16,
    process: Option<Process>,
}

impl PrivateRedis {
    fn start(port: u16) -> Self {
        let mut redis = Self {
            port,
            process: None,
        };
        redis.restart();
        redis
    }

    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/services installs it)");
        self.process = Some(Process(child));
        wait_for_port(self.port);
    }

    fn stop(&mut self) {
        self.process = None;
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Cluster {
    database_url: String,
    catalog_path: String,
    redis_url: String,
    node_ports: Vec<u16>,
    router_ports: Vec<u16>,
    nodes: Vec<Option<Process>>,
    _routers: Vec<Process>,
}

impl Cluster {
    fn start_node(&mut self, index: usize) {
        let port = self.node_ports[index];
        let node = spawn(
            &[
                "coordinator",
                "--node-id",
                &format!("coordinator-{index}"),
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--redis-url",
                &self.redis_url,
                "--drain-timeout-secs",
                "5",
                "--catalog",
                &self.catalog_path,
            ],
            &[
                ("DATABASE_URL", &self.database_url),
                ("SWITCHYARD_CLUSTER_TOKEN", CLUSTER_TOKEN),
            ],
        );
        wait_for_port(port);
        if index < self.nodes.len() {
            self.nodes[index] = Some(node);
        } else {
            self.nodes.push(Some(node));
        }
    }

    fn router_base(&self, index: usize) -> String {
        format!("http://127.0.0.1:{}/v1", self.router_ports[index])
    }

    /// Provider sessions per live node, from each node's metrics.
    async fn sessions(&self) -> Vec<f64> {
        let mut sessions = Vec::new();
        for (index, node) in self.nodes.iter().enumerate() {
            if node.is_none() {
                continue;
            }
            let url = format!("http://127.0.0.1:{}/metrics", self.node_ports[index]);
            let count = match reqwest::get(&url).await {
                Ok(response) => response
                    .text()
                    .await
                    .unwrap_or_default()
                    .lines()
                    .find(|line| line.starts_with("switchyard_node_provider_sessions "))
                    .and_then(|line| line.rsplit(' ').next()?.parse().ok())
                    .unwrap_or(0.0),
                Err(_) => 0.0,
            };
            sessions.push(count);
        }
        sessions
    }

    async fn total_sessions(&self) -> f64 {
        self.sessions().await.iter().sum()
    }
}

async fn chat(base: &str, key: &str, model: &str) -> u16 {
    let mut body = common::chat_body(false);
    body["model"] = serde_json::json!(model);
    reqwest::Client::new()
        .post(format!("{base}/chat/completions"))
        .bearer_auth(key)
        .timeout(Duration::from_secs(30))
        .json(&body)
        .send()
        .await
        .map_or(0, |response| response.status().as_u16())
}

async fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl AsyncFnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    while !condition().await {
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_survives_node_loss_and_growth() {
    let database = TestDatabase::create().await.unwrap();
    let ledger = database.ledger(4).unwrap();
    let account = AccountId::from("acme");
    ledger.create_account(&account).await.unwrap();
    ledger
        .credit(&account, MicroUsd::from_usd(100), "seed")
        .await
        .unwrap();
    let key = ledger
        .issue_api_key(&account, "multi-process")
        .await
        .unwrap()
        .secret;

    let mut redis = PrivateRedis::start(free_port());
    let node_ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let router_ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    // One model per provider, so that which providers move follows the ring
    // closely rather than in groups.
    let models: Vec<String> = (0..PROVIDERS)
        .map(|index| format!("test/model-{index:02}"))
        .collect();
    let entries: Vec<serde_json::Value> = models
        .iter()
        .map(|id| serde_json::json!({"id": id, "input_per_mtok": 23000, "output_per_mtok": 75000, "min_charge": 100}))
        .collect();
    let catalog_path = std::env::temp_dir().join(format!(
        "switchyard-multi-process-{}.json",
        std::process::id()
    ));
    std::fs::write(
        &catalog_path,
        serde_json::json!({"models": entries}).to_string(),
    )
    .unwrap();
    let catalog_path = catalog_path.to_string_lossy().into_owned();

    let mut cluster = Cluster {
        database_url: database.url.clone(),
        catalog_path: catalog_path.clone(),
        redis_url: redis.url(),
        node_ports: node_ports.clone(),
        router_ports: router_ports.clone(),
        nodes: Vec::new(),
        _routers: Vec::new(),
    };
    for index in 0..3 {
        cluster.start_node(index);
    }
    let node_list: Vec<String> = (0..3)
        .map(|index| {
            format!(
                "--node=coordinator-{index}=http://127.0.0.1:{}",
                node_ports[index]
            )
        })
        .collect();
    for port in &router_ports {
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec![
            "router",
            "--listen",
            &listen,
            "--redis-url",
            &cluster.redis_url,
            "--catalog",
            &catalog_path,
        ];
        args.extend([
            "--default-requests-per-minute",
            "0",
            "--default-tokens-per-minute",
            "0",
            "--routers",
            "2",
        ]);
        args.extend(node_list.iter().map(String::as_str));
        cluster._routers.push(spawn(
            &args,
            &[
                ("DATABASE_URL", &database.url),
                ("SWITCHYARD_CLUSTER_TOKEN", CLUSTER_TOKEN),
            ],
        ));
        wait_for_port(*port);
    }

    // Providers with one primary model each, half through each router, with
    // the provider agent's reconnect backoff (1 s doubling to 5 s).
    let providers: Vec<SimProvider> = (0..PROVIDERS)
        .map(|index| {
            let router = router_ports[index % 2];
            let mut served = models.clone();
            served.rotate_left(index);
            let config =
                SimProviderConfig::new(format!("ws://127.0.0.1:{router}/ws/provider"), served);
            SimProvider::spawn(config)
        })
        .collect();
    let all = PROVIDERS as f64;
    wait_until(
        "every provider is on a node",
        Duration::from_secs(20),
        async || cluster.total_sessions().await == all,
    )
    .await;
    let sample: Vec<&String> = models.iter().take(4).collect();

    // Every model is served through either router, including models whose
    // providers live on a node that does not own them.
    for model in &sample {
        for router in 0..2 {
            assert_eq!(
                chat(&cluster.router_base(router), &key, model).await,
                200,
                "model {model} via router {router}"
            );
        }
    }

    // A fourth node joins: about a quarter of the providers move to it, and no
    // request fails meanwhile.
    cluster.start_node(3);
    let mut statuses = Vec::new();
    let joined = Instant::now();
    while joined.elapsed() < Duration::from_secs(8) {
        statuses.push(chat(&cluster.router_base(1), &key, sample[0]).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        statuses.iter().all(|status| *status == 200),
        "requests failed while providers moved: {statuses:?}"
    );
    wait_until(
        "the moved providers are connected again",
        Duration::from_secs(15),
        async || {
            cluster.total_sessions().await == all
                && cluster.sessions().await.last().copied().unwrap_or(0.0) > 0.0
        },
    )
    .await;
    let moved = cluster.sessions().await.last().copied().unwrap_or(0.0);
    println!("{moved} of {PROVIDERS} providers moved to the fourth node");
    assert!(
        (2.0..=12.0).contains(&moved),
        "{moved} of {PROVIDERS} providers moved to the new node"
    );

    // kill -9 of the node with the most providers.
    let sessions = cluster.sessions().await;
    let victim = (0..sessions.len())
        .max_by(|a, b| sessions[*a].total_cmp(&sessions[*b]))
        .unwrap();
    assert!(sessions[victim] > 0.0);
    cluster.nodes[victim] = None;
    let killed_at = Instant::now();

    // Load right after the kill, while routers still list the dead node: a
    // request sent to it is refused before it starts and goes to the next
    // node, so it succeeds, or gets 503 if every provider of its model was on
    // the dead node and has not reconnected yet. Nothing else.
    let bases: Vec<String> = (0..2).map(|router| cluster.router_base(router)).collect();
    let load = (0..24).map(|index| {
        let base = bases[index % 2].clone();
        let model = models[index % models.len()].clone();
        let key = key.clone();
        async move { chat(&base, &key, &model).await }
    });
    let statuses = futures::future::join_all(load).await;
    assert!(
        statuses.iter().all(|status| matches!(status, 200 | 503)),
        "requests during the kill: {statuses:?}"
    );
    assert!(
        statuses.contains(&200),
        "requests for models served elsewhere succeed: {statuses:?}"
    );

    let rehomed_in = killed_at.elapsed()
        + wait_until(
            "the victim's providers are on other nodes",
            Duration::from_secs(15),
            async || cluster.total_sessions().await == all,
        )
        .await;
    println!("providers routable again {rehomed_in:?} after kill -9");
    assert!(
        rehomed_in <= Duration::from_secs(10),
        "re-homing took {rehomed_in:?}"
    );
    for model in &sample {
        assert_eq!(
            chat(&cluster.router_base(0), &key, model).await,
            200,
            "model {model} after the kill"
        );
    }

    // A rate limit is shared by both router processes.
    let limited = AccountId::from("limited");
    ledger.create_account(&limited).await.unwrap();
    ledger
        .credit(&limited, MicroUsd::from_usd(10), "seed")
        .await
        .unwrap();
    let limits = switchyard_shared::ledger::RateLimits {
        requests_per_minute: Some(6),
        tokens_per_minute: None,
    };
    ledger.set_rate_limits(&limited, limits).await.unwrap();
    let limited_key = ledger
        .issue_api_key(&limited, "limited")
        .await
        .unwrap()
        .secret;
    let mut accepted = 0;
    for attempt in 0..20 {
        if chat(&cluster.router_base(attempt % 2), &limited_key, sample[0]).await == 200 {
            accepted += 1;
        }
    }
    // Six at once, plus at most one refilled during the run.
    assert!(
        (6..=7).contains(&accepted),
        "{accepted} of 20 accepted with a limit of 6 per minute"
    );

    // Redis restarted under load: requests keep succeeding throughout.
    redis.stop();
    for model in &sample {
        assert_eq!(
            chat(&cluster.router_base(0), &key, model).await,
            200,
            "model {model} without Redis"
        );
    }
    redis.restart();
    // Membership recovers on its own: every live node writes its record again.
    let live_nodes = cluster.nodes.iter().filter(|node| node.is_some()).count();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    wait_until(
        "every live node is a member again",
        Duration::from_secs(10),
        async || {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("switchyard:member:*")
                .query_async(&mut connection)
                .await
                .unwrap_or_default();
            keys.len() == live_nodes
        },
    )
    .await;
    for model in &sample {
        assert_eq!(
            chat(&cluster.router_base(1), &key, model).await,
            200,
            "model {model} after Redis returned"
        );
    }

    // Each served request was billed once.
    let usage = ledger.usage(&account, 500, None).await.unwrap();
    let billed: i64 = usage.iter().map(|record| record.cost.get()).sum();
    let balance = ledger.balance(&account).await.unwrap();
    assert_eq!(
        MicroUsd::from_usd(100) - balance.balance,
        MicroUsd::new(billed)
    );
    assert_eq!(balance.held, MicroUsd::ZERO, "no hold is left open");

    drop(providers);
    drop(cluster);
    drop(ledger);
    let _ = std::fs::remove_file(&catalog_path);
    database.drop_database().await.unwrap();
}
