//! The provider WebSocket protocol, wire-compatible with the provider agents of the
//! system Switchyard replaces.
//!
//! Every message is one JSON object in one text frame, discriminated by `"type"`.
//! Field names are snake_case and must match exactly: the provider parses with
//! serde and no case folding. Unknown fields are ignored in both directions.
//!
//! Provider messages are decoded in two steps (read `type`, then the concrete
//! struct) because `register` carries its attestation as raw JSON bytes, whose
//! signature covers those exact bytes, and `RawValue` does not survive serde's
//! internally tagged enums.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Maximum size of one WebSocket message on a provider session.
pub const MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;

/// A message sent by a provider.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ProviderMessage {
    Register(Register),
    Heartbeat(Heartbeat),
    InferenceAccepted(InferenceAccepted),
    InferenceResponseChunk(InferenceResponseChunk),
    InferenceComplete(InferenceComplete),
    InferenceError(InferenceError),
    AttestationResponse(AttestationResponse),
}

/// Why a provider frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("message is not a JSON object with a string `type`")]
    MissingType(#[source] serde_json::Error),
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    #[error("invalid `{kind}` message")]
    InvalidMessage {
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

#[derive(Deserialize)]
struct TypeTag<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
}

impl ProviderMessage {
    /// Decodes one text frame from a provider.
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        let tag: TypeTag<'_> = serde_json::from_str(text).map_err(ProtocolError::MissingType)?;

        fn concrete<'a, T: Deserialize<'a>>(
            text: &'a str,
            kind: &'static str,
        ) -> Result<T, ProtocolError> {
            serde_json::from_str(text)
                .map_err(|source| ProtocolError::InvalidMessage { kind, source })
        }

        let message = match tag.kind.as_ref() {
            "register" => Self::Register(concrete(text, "register")?),
            "heartbeat" => Self::Heartbeat(concrete(text, "heartbeat")?),
            "inference_accepted" => Self::InferenceAccepted(concrete(text, "inference_accepted")?),
            "inference_response_chunk" => {
                Self::InferenceResponseChunk(concrete(text, "inference_response_chunk")?)
            }
            "inference_complete" => Self::InferenceComplete(concrete(text, "inference_complete")?),
            "inference_error" => Self::InferenceError(concrete(text, "inference_error")?),
            "attestation_response" => {
                Self::AttestationResponse(concrete(text, "attestation_response")?)
            }
            other => return Err(ProtocolError::UnknownType(other.to_owned())),
        };
        Ok(message)
    }

    /// Encodes the message as the JSON text of one frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("provider messages always serialize")
    }
}

/// A message sent by a coordinator. These four are the only types a provider parses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoordinatorMessage {
    InferenceRequest(InferenceRequest),
    Cancel(Cancel),
    AttestationChallenge(AttestationChallenge),
    RuntimeStatus(RuntimeStatus),
}

impl CoordinatorMessage {
    /// Encodes the message as the JSON text of one frame.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("coordinator messages always serialize")
    }

    /// Decodes one text frame from a coordinator.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// First message of every provider connection, re-sent on each reconnect.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Register {
    pub hardware: Hardware,
    pub models: Vec<ModelInfo>,
    pub backend: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Base64 of the provider's 32-byte X25519 public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub encrypted_response_chunks: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wallet_address: Option<String>,
    /// The signed attestation object, byte for byte as received. Parse it with
    /// [`SignedAttestation::parse`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attestation: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_tps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_tps: Option<f64>,
    /// Provider token that links earnings to an account. A secret: never log it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_hash: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub template_hashes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy_capabilities: Option<PrivacyCapabilities>,
}

/// `register.attestation`: the blob signed by the provider's Secure Enclave key and
/// its signature. The blob stays raw because the signature covers its exact bytes.
#[derive(Debug, Deserialize)]
pub struct SignedAttestation {
    pub attestation: Box<RawValue>,
    /// Base64 DER ECDSA P-256 signature over the raw blob bytes.
    pub signature: String,
}

impl SignedAttestation {
    pub fn parse(raw: &RawValue) -> Result<Self, serde_json::Error> {
        serde_json::from_str(raw.get())
    }
}

/// The fields of an attestation blob that a coordinator reads. The blob's keys are
/// camelCase because a Swift helper produces it.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttestationBlob {
    #[serde(default)]
    pub authenticated_root_enabled: bool,
    #[serde(default)]
    pub binary_hash: Option<String>,
    #[serde(default)]
    pub chip_name: String,
    #[serde(default)]
    pub encryption_public_key: Option<String>,
    #[serde(default)]
    pub hardware_model: String,
    #[serde(default)]
    pub os_version: String,
    /// Base64 of the raw P-256 point `X || Y` (64 bytes), or `0x04 || X || Y`.
    pub public_key: String,
    #[serde(default)]
    pub rdma_disabled: bool,
    #[serde(default)]
    pub secure_boot_enabled: bool,
    #[serde(default)]
    pub secure_enclave_available: bool,
    #[serde(default)]
    pub serial_number: Option<String>,
    #[serde(default)]
    pub sip_enabled: bool,
    #[serde(default)]
    pub system_volume_hash: Option<String>,
    pub timestamp: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Hardware {
    #[serde(default)]
    pub machine_model: String,
    #[serde(default)]
    pub chip_name: String,
    #[serde(default)]
    pub chip_family: String,
    #[serde(default)]
    pub chip_tier: String,
    #[serde(default)]
    pub memory_gb: u64,
    /// Sent as an integer by current providers; read as a float for older ones.
    #[serde(default)]
    pub memory_available_gb: f64,
    #[serde(default)]
    pub cpu_cores: CpuCores,
    #[serde(default)]
    pub gpu_cores: u32,
    /// Sent as an integer by current providers; read as a float for older ones.
    #[serde(default)]
    pub memory_bandwidth_gbs: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuCores {
    #[serde(default)]
    pub total: u32,
    #[serde(default)]
    pub performance: u32,
    #[serde(default)]
    pub efficiency: u32,
}

/// One model a provider offers. `model_type`, `parameters` and `quantization` are
/// written as `null` when unknown, as the provider does.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub parameters: Option<u64>,
    #[serde(default)]
    pub quantization: Option<String>,
    #[serde(default)]
    pub size_bytes: u64,
    #[serde(default)]
    pub estimated_memory_gb: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_hash: Option<String>,
}

/// Self-reported privacy invariants of a provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrivacyCapabilities {
    #[serde(default)]
    pub text_backend_inprocess: bool,
    #[serde(default)]
    pub text_proxy_disabled: bool,
    #[serde(default)]
    pub python_runtime_locked: bool,
    #[serde(default)]
    pub dangerous_modules_blocked: bool,
    #[serde(default)]
    pub sip_enabled: bool,
    #[serde(default)]
    pub anti_debug_enabled: bool,
    #[serde(default)]
    pub core_dumps_disabled: bool,
    #[serde(default)]
    pub env_scrubbed: bool,
    #[serde(default)]
    pub hypervisor_active: bool,
}

/// Periodic liveness and load report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    pub status: ProviderStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_model: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm_models: Vec<String>,
    #[serde(default)]
    pub stats: ProviderStats,
    /// Always sent by current providers; older ones may omit it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_metrics: Option<SystemMetrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_capacity: Option<BackendCapacity>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderStatus {
    Idle,
    Serving,
    #[serde(other)]
    Unknown,
}

/// Counters since the provider process started; they reset when it restarts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderStats {
    #[serde(default)]
    pub requests_served: u64,
    #[serde(default)]
    pub tokens_generated: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct SystemMetrics {
    /// 0 to 1.
    #[serde(default)]
    pub memory_pressure: f64,
    /// 0 to 1.
    #[serde(default)]
    pub cpu_usage: f64,
    #[serde(default)]
    pub thermal_state: ThermalState,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThermalState {
    #[default]
    Nominal,
    Fair,
    Serious,
    Critical,
    #[serde(other)]
    Unknown,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BackendCapacity {
    #[serde(default)]
    pub slots: Vec<BackendSlotCapacity>,
    #[serde(default)]
    pub gpu_memory_active_gb: f64,
    #[serde(default)]
    pub gpu_memory_peak_gb: f64,
    #[serde(default)]
    pub gpu_memory_cache_gb: f64,
    #[serde(default)]
    pub total_memory_gb: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BackendSlotCapacity {
    pub model: String,
    pub state: BackendSlotState,
    #[serde(default)]
    pub num_running: u32,
    #[serde(default)]
    pub num_waiting: u32,
    #[serde(default)]
    pub active_tokens: i64,
    #[serde(default)]
    pub max_tokens_potential: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendSlotState {
    Running,
    Idle,
    IdleShutdown,
    Crashed,
    Reloading,
    #[serde(other)]
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferenceAccepted {
    pub request_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferenceResponseChunk {
    pub request_id: String,
    /// Legacy plaintext chunk. A coordinator rejects a chunk that uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encrypted_data: Option<EncryptedPayload>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferenceComplete {
    pub request_id: String,
    pub usage: Usage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub se_signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_hash: Option<String>,
}

/// Token counts reported by a provider. The wire carries no total.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferenceError {
    pub request_id: String,
    pub error: String,
    /// An HTTP-like status; 0 means unknown.
    pub status_code: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationResponse {
    pub nonce: String,
    /// Base64 DER ECDSA over `nonce + timestamp`; empty without a Secure Enclave.
    #[serde(default)]
    pub signature: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_signature: Option<String>,
    /// The provider's X25519 key (not its signing key); empty if it has none.
    #[serde(default)]
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hypervisor_active: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdma_disabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sip_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_model_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub python_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_hash: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub template_hashes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub model_hashes: BTreeMap<String, String>,
}

/// A NaCl box: `ciphertext` is base64 of `nonce(24) || box`. In a request it carries
/// the coordinator's per-attempt public key; in a chunk, the provider's static key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedPayload {
    pub ephemeral_public_key: String,
    pub ciphertext: String,
}

/// A sealed inference request. The plaintext body is never sent: current providers
/// reject requests without `encrypted_body`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferenceRequest {
    pub request_id: String,
    pub encrypted_body: EncryptedPayload,
}

/// Advisory: the provider stops tracking the request, but chunks may still arrive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    pub request_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationChallenge {
    /// Base64 of 32 random bytes.
    pub nonce: String,
    /// UTC RFC 3339 with second precision, for example `2026-05-01T10:00:00Z`.
    pub timestamp: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeStatus {
    pub verified: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatches: Vec<RuntimeMismatch>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeMismatch {
    pub component: String,
    pub expected: String,
    pub got: String,
}

#[cfg(test)]
mod tests;
