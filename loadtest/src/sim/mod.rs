//! A simulated provider: it dials a coordinator over a real WebSocket and speaks the
//! provider side of the protocol, responding to sealed inference requests with
//! deterministic text.
//!
//! One Tokio task per provider runs the connection loop (connect, `register`,
//! serve, reconnect with backoff). Inside a connection, one task per inference
//! request generates the response and hands its frames to the connection, which is
//! their only writer. Tests steer a running provider through [`SimProvider`]:
//! [`SimProvider::set_behavior`] injects failures and [`SimProvider::stats`] and
//! [`SimProvider::wait_until`] observe what it received and sent.
//!
//! NOTE: unlike the provider agent, the simulation sends no WebSocket pings and
//! never gives up on a silent coordinator, and it has no Secure Enclave, so it
//! sends no attestation blob and empty challenge signatures.

mod completion;
mod frames;
mod request;
mod session;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use switchyard_shared::protocol::{CpuCores, Hardware};
use switchyard_shared::seal::KeyPair;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use completion::{
    DEFAULT_MAX_TOKENS, DONE_LINE, PROMPT_TOKENS_PER_MESSAGE, completion_token_count,
    count_prompt_tokens, response_hash, simulated_completion_text, simulated_token,
};

use session::SessionEnd;

/// Response mode a simulated provider applies to the next inference requests.
/// Each request reads the behavior once, when it arrives, so a change affects only
/// later requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Behavior {
    /// Accept, stream the deterministic completion, then send `inference_complete`.
    #[default]
    Normal,
    /// Accept, then send `inference_error` with this status instead of any chunk.
    FailBeforeFirstChunk { status_code: i64 },
    /// Close the TCP connection without a WebSocket close frame right after this
    /// many content chunks. A streamed response's role chunk does not count; a
    /// non-streamed response's single chunk does. A response with fewer content
    /// chunks is cut just before its `inference_complete`.
    DropAfterChunks(u64),
    /// Send every chunk in the legacy plaintext `data` field instead of
    /// `encrypted_data`, which a coordinator must reject.
    PlaintextChunks,
    /// Accept, then send nothing more until the request is cancelled or the
    /// connection ends.
    Stall,
}

/// Settings of one simulated provider.
#[derive(Clone, Debug)]
pub struct SimProviderConfig {
    /// Coordinator endpoint, for example `ws://127.0.0.1:8080/ws/provider`. Only
    /// `ws://` is supported because the WebSocket client is built without TLS.
    pub url: String,
    /// Label for logs; it is never sent on the wire.
    pub name: String,
    /// Model ids announced in `register`, each with one backend slot in heartbeats.
    pub models: Vec<String>,
    /// Provider token sent in `register`. A secret: never logged.
    pub auth_token: Option<String>,
    pub hardware: Hardware,
    /// Time between heartbeats; the first one follows `register` at once.
    pub heartbeat_interval: Duration,
    /// Content chunks per second for each request. Zero, a negative value or NaN
    /// sends them as fast as the connection takes them.
    pub token_rate: f64,
    /// Completion tokens per response, further capped by the request's own limit.
    pub completion_tokens: u64,
    /// Whether to reconnect after the connection ends or fails to open.
    pub reconnect: bool,
    /// Delay before the first reconnect attempt; it doubles after each failed
    /// attempt up to `reconnect_max_delay`.
    pub reconnect_initial_delay: Duration,
    pub reconnect_max_delay: Duration,
    /// Limit on the TCP connect plus WebSocket handshake.
    pub connect_timeout: Duration,
    /// Behavior in force when the provider starts.
    pub behavior: Behavior,
}

impl SimProviderConfig {
    /// Creates a configuration with the provider agent's defaults: heartbeats every
    /// 5 s, reconnect delays of 1, 2 and 4 s capped at 5 s, 16 completion tokens at
    /// unlimited speed, and the hardware of [`simulated_hardware`].
    pub fn new(url: impl Into<String>, models: Vec<String>) -> Self {
        Self {
            url: url.into(),
            name: "sim-provider".to_owned(),
            models,
            auth_token: None,
            hardware: simulated_hardware(),
            heartbeat_interval: Duration::from_secs(5),
            token_rate: 0.0,
            completion_tokens: 16,
            reconnect: true,
            reconnect_initial_delay: Duration::from_secs(1),
            reconnect_max_delay: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            behavior: Behavior::Normal,
        }
    }
}

/// Returns the hardware a simulated provider reports by default: an M4 Max with
/// 128 GB, as in the provider agent's documentation.
pub fn simulated_hardware() -> Hardware {
    Hardware {
        machine_model: "Mac16,1".to_owned(),
        chip_name: "Apple M4 Max".to_owned(),
        chip_family: "M4".to_owned(),
        chip_tier: "Max".to_owned(),
        memory_gb: 128,
        memory_available_gb: 124.0,
        cpu_cores: CpuCores {
            total: 16,
            performance: 12,
            efficiency: 4,
        },
        gpu_cores: 40,
        memory_bandwidth_gbs: 546.0,
    }
}

/// Counters and state of one simulated provider, over all its connections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// WebSocket handshakes that succeeded.
    pub connections: u64,
    /// Whether a connection is open and its `register` was sent.
    pub connected: bool,
    pub registrations: u64,
    pub heartbeats_sent: u64,
    pub challenges_answered: u64,
    pub runtime_status_received: u64,
    /// Every `inference_request` frame, including those that could not be opened.
    pub requests_received: u64,
    /// Requests dropped without a reply because their body did not open with the
    /// provider's key or was not JSON, as the provider agent does.
    pub requests_undecryptable: u64,
    /// Requests that ended with `inference_complete`.
    pub completed: u64,
    /// Requests that ended with `inference_error`.
    pub errors_sent: u64,
    /// Completion tokens of completed requests.
    pub tokens_generated: u64,
    /// Requests being generated or stalled right now.
    pub in_flight: u64,
    /// Request ids of every `cancel` received, in order, including ids the provider
    /// had already finished or never saw.
    pub cancelled_request_ids: Vec<String>,
    /// Requests whose generation a `cancel` stopped.
    pub stopped_by_cancel: u64,
    /// Connections closed on purpose by [`Behavior::DropAfterChunks`].
    pub connections_dropped: u64,
    /// Code of the last close frame received from the coordinator.
    pub last_close_code: Option<u16>,
}

/// A request being generated, and the token that stops it.
struct ActiveRequest {
    model: String,
    cancel: CancellationToken,
}

/// State shared by the handle, the connection loop and the request tasks.
struct Shared {
    config: SimProviderConfig,
    key_pair: KeyPair,
    public_key: String,
    behavior: Mutex<Behavior>,
    stats: watch::Sender<SimStats>,
    active: Mutex<HashMap<String, ActiveRequest>>,
    /// Model of the latest request, reported as `active_model` in heartbeats.
    last_model: Mutex<Option<String>>,
}

impl Shared {
    fn update_stats(&self, update: impl FnOnce(&mut SimStats)) {
        self.stats.send_modify(update);
    }

    fn behavior(&self) -> Behavior {
        *lock(&self.behavior)
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked, because
/// every critical section here is a single insert, remove or copy.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running simulated provider. Dropping it stops the provider, like
/// [`SimProvider::shutdown`].
pub struct SimProvider {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl SimProvider {
    /// Starts a provider with a fresh X25519 key pair. It keeps that key across
    /// reconnects, as the provider agent does within one process.
    ///
    /// # Panics
    ///
    /// Panics when called outside a Tokio runtime.
    pub fn spawn(config: SimProviderConfig) -> Self {
        Self::spawn_with_shutdown(config, &CancellationToken::new())
    }

    /// Starts a provider that also stops when `shutdown` is cancelled.
    ///
    /// # Panics
    ///
    /// Panics when called outside a Tokio runtime.
    pub fn spawn_with_shutdown(config: SimProviderConfig, shutdown: &CancellationToken) -> Self {
        let key_pair = KeyPair::generate();
        let public_key = key_pair.public_base64();
        let span = tracing::info_span!("sim_provider", provider.name = %config.name);

        let shared = Arc::new(Shared {
            behavior: Mutex::new(config.behavior),
            config,
            key_pair,
            public_key,
            stats: watch::Sender::new(SimStats::default()),
            active: Mutex::new(HashMap::new()),
            last_model: Mutex::new(None),
        });

        let shutdown = shutdown.child_token();
        let task = tokio::spawn(run(Arc::clone(&shared), shutdown.clone()).instrument(span));

        Self {
            shared,
            shutdown,
            task: Some(task),
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// Returns the provider's X25519 public key, standard base64 as sent in `register`.
    pub fn public_key(&self) -> &str {
        &self.shared.public_key
    }

    pub fn behavior(&self) -> Behavior {
        self.shared.behavior()
    }

    /// Sets the behavior for requests that arrive from now on.
    pub fn set_behavior(&self, behavior: Behavior) {
        *lock(&self.shared.behavior) = behavior;
    }

    /// Returns a snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        self.shared.stats.borrow().clone()
    }

    /// Waits until `condition` holds for the counters and returns the snapshot it
    /// held for. Callers bound the wait with a timeout.
    pub async fn wait_until(&self, mut condition: impl FnMut(&SimStats) -> bool) -> SimStats {
        let mut receiver = self.shared.stats.subscribe();
        match receiver.wait_for(|stats| condition(stats)).await {
            Ok(stats) => stats.clone(),
            // The sender lives in `self.shared`, so it cannot be dropped while
            // `self` is borrowed.
            Err(_) => self.stats(),
        }
    }

    /// Waits until a `cancel` for `request_id` has arrived.
    pub async fn wait_for_cancel(&self, request_id: &str) {
        self.wait_until(|stats| {
            stats
                .cancelled_request_ids
                .iter()
                .any(|id| id == request_id)
        })
        .await;
    }

    /// Waits until the provider has sent `register` at least `count` times.
    pub async fn wait_for_registrations(&self, count: u64) {
        self.wait_until(|stats| stats.registrations >= count).await;
    }

    /// Returns whether the connection loop is still running.
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|task| !task.is_finished())
    }

    /// Asks the provider to stop. It sends a close frame with code 1000 on an open
    /// connection and aborts its in-flight requests.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops the provider and waits until its connection loop has ended.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let Some(task) = self.task.take() else {
            return;
        };
        if let Err(error) = task.await {
            tracing::warn!(provider.name = %self.name(), %error, "simulated provider task failed");
        }
    }
}

impl Drop for SimProvider {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs connections until shutdown, or until the first one ends when reconnecting
/// is off.
async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let config = &shared.config;
    let mut delay = config.reconnect_initial_delay;

    loop {
        match session::run(&shared, &shutdown).await {
            SessionEnd::Shutdown => break,
            SessionEnd::ConnectFailed(error) => {
                tracing::warn!(
                    url = %config.url,
                    error = %error,
                    "failed to connect to coordinator"
                );
            }
            SessionEnd::Ended(reason) => {
                tracing::info!(reason = %reason, "connection to coordinator ended");
                delay = config.reconnect_initial_delay;
            }
        }

        if !config.reconnect {
            break;
        }

        tracing::info!(
            retry_in_ms = delay.as_millis(),
            "reconnecting to coordinator"
        );
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
        delay = delay.saturating_mul(2).min(config.reconnect_max_delay);
    }

    tracing::info!("simulated provider stopped");
}
