//! Settings of one coordinator node, with the defaults and units of each.

use std::time::Duration;

use switchyard_shared::ids::NodeId;

/// Minimum trust a provider needs before it is offered requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum TrustLevel {
    /// Registered with a valid key; challenges still run and a failed one blocks
    /// routing until the next one passes.
    None,
    /// A valid Secure Enclave attestation.
    SelfSigned,
    /// Attestation backed by device management or a hardware-bound certificate.
    Hardware,
}

impl std::str::FromStr for TrustLevel {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "none" => Ok(TrustLevel::None),
            "self_signed" => Ok(TrustLevel::SelfSigned),
            "hardware" => Ok(TrustLevel::Hardware),
            other => Err(format!(
                "invalid trust level `{other}`: expected none, self_signed or hardware"
            )),
        }
    }
}

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: NodeId,
    /// Shared secret that routers present on every internal call.
    pub cluster_token: String,
    pub min_trust: TrustLevel,
    /// A provider silent for longer than this is evicted and its socket closed.
    pub heartbeat_timeout: Duration,
    /// Time between attestation challenges; the first is sent right after register.
    pub challenge_interval: Duration,
    /// Time a provider has to respond to a challenge.
    pub challenge_timeout: Duration,
    /// Time for a provider to accept, start or reject a new request.
    pub first_response_timeout: Duration,
    /// After acceptance: time to the first chunk, between chunks, and for a whole
    /// non-streaming response.
    pub response_timeout: Duration,
    /// Dispatch attempts before the first content chunk, each on another provider.
    pub max_attempts: u32,
    /// Requests that may wait per model when every provider is busy.
    pub queue_capacity: usize,
    /// Maximum wait in a model's queue.
    pub queue_timeout: Duration,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// How long a settlement is retried while the ledger is unavailable, before
    /// the request ends with an error and its hold is left to the sweeper.
    pub settle_retry_window: Duration,
    /// Holds open longer than this are released by the sweeper: their node died.
    /// Must exceed the longest request.
    pub hold_timeout: Duration,
    /// Time between sweeps for stale holds; zero disables the sweeper.
    pub sweep_interval: Duration,
    /// Base URL routers use to reach this node; `http://<listen address>` when
    /// `None`, which only works when that address is reachable from routers.
    pub advertise_url: Option<String>,
}

impl NodeConfig {
    /// Settings with the protocol's reference timings.
    pub fn new(node_id: NodeId, cluster_token: String) -> Self {
        Self {
            node_id,
            cluster_token,
            min_trust: TrustLevel::None,
            heartbeat_timeout: Duration::from_secs(90),
            challenge_interval: Duration::from_secs(300),
            challenge_timeout: Duration::from_secs(30),
            first_response_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(600),
            max_attempts: 3,
            queue_capacity: 10,
            queue_timeout: Duration::from_secs(30),
            max_body_bytes: 10 * 1024 * 1024,
            settle_retry_window: Duration::from_secs(30),
            // NOTE: a stream that lasts longer than this loses its hold and is
            // not charged. Holds of departed nodes are released sooner, by
            // membership, so this only backs that up and can stay generous.
            hold_timeout: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(60),
            advertise_url: None,
        }
    }
}
