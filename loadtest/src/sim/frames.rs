//! The provider messages that describe the simulated machine: `register`,
//! `heartbeat` and `attestation_response`.

use std::collections::{BTreeMap, HashMap};

use switchyard_shared::protocol::{
    AttestationChallenge, AttestationResponse, BackendCapacity, BackendSlotCapacity,
    BackendSlotState, Heartbeat, ModelInfo, PrivacyCapabilities, ProviderStats, ProviderStatus,
    Register, SystemMetrics, ThermalState,
};

use super::{Shared, lock};

/// Backend reported in `register`; the only one a coordinator routes private text to.
pub(super) const BACKEND: &str = "inprocess-mlx";

/// Provider agent version the simulation imitates.
pub(super) const PROVIDER_VERSION: &str = "0.4.7";

/// Nominal size of every simulated model. The numbers are made up: nothing is loaded.
const MODEL_SIZE_BYTES: u64 = 8_000_000_000;
const MODEL_MEMORY_GB: f64 = 8.5;

pub(super) fn register(shared: &Shared) -> Register {
    let config = &shared.config;
    let models = config
        .models
        .iter()
        .map(|id| ModelInfo {
            id: id.clone(),
            model_type: None,
            parameters: None,
            quantization: None,
            size_bytes: MODEL_SIZE_BYTES,
            estimated_memory_gb: MODEL_MEMORY_GB,
            weight_hash: None,
        })
        .collect();

    Register {
        hardware: config.hardware.clone(),
        models,
        backend: BACKEND.to_owned(),
        version: Some(PROVIDER_VERSION.to_owned()),
        public_key: Some(shared.public_key.clone()),
        encrypted_response_chunks: true,
        wallet_address: None,
        attestation: None,
        prefill_tps: None,
        decode_tps: None,
        auth_token: config.auth_token.clone(),
        python_hash: None,
        runtime_hash: None,
        template_hashes: BTreeMap::new(),
        privacy_capabilities: Some(PrivacyCapabilities {
            text_backend_inprocess: true,
            text_proxy_disabled: true,
            python_runtime_locked: true,
            dangerous_modules_blocked: true,
            sip_enabled: true,
            anti_debug_enabled: true,
            core_dumps_disabled: true,
            env_scrubbed: true,
            hypervisor_active: false,
        }),
    }
}

/// Builds a heartbeat from the current in-flight requests and lifetime counters.
pub(super) fn heartbeat(shared: &Shared) -> Heartbeat {
    let config = &shared.config;

    let mut running_by_model: HashMap<String, u32> = HashMap::new();
    for request in lock(&shared.active).values() {
        *running_by_model.entry(request.model.clone()).or_default() += 1;
    }
    let in_flight: u32 = running_by_model.values().sum();

    let slots = config
        .models
        .iter()
        .map(|model| BackendSlotCapacity {
            model: model.clone(),
            state: BackendSlotState::Running,
            num_running: running_by_model.get(model).copied().unwrap_or(0),
            num_waiting: 0,
            active_tokens: 0,
            max_tokens_potential: 0,
        })
        .collect();

    let active_model = lock(&shared.last_model)
        .clone()
        .or_else(|| config.models.first().cloned());
    let (requests_served, tokens_generated) = {
        let stats = shared.stats.borrow();
        (stats.completed, stats.tokens_generated)
    };
    let loaded_gb = MODEL_MEMORY_GB * config.models.len() as f64;

    Heartbeat {
        status: if in_flight > 0 {
            ProviderStatus::Serving
        } else {
            ProviderStatus::Idle
        },
        active_model,
        warm_models: config.models.clone(),
        stats: ProviderStats {
            requests_served,
            tokens_generated,
        },
        system_metrics: Some(SystemMetrics {
            memory_pressure: 0.2,
            cpu_usage: (0.05 + 0.1 * f64::from(in_flight)).min(1.0),
            thermal_state: ThermalState::Nominal,
        }),
        backend_capacity: Some(BackendCapacity {
            slots,
            gpu_memory_active_gb: loaded_gb,
            gpu_memory_peak_gb: loaded_gb,
            gpu_memory_cache_gb: 0.0,
            total_memory_gb: config.hardware.memory_gb as f64,
        }),
    }
}

/// Builds the challenge response of a provider without a Secure Enclave: the nonce echoed,
/// empty signatures, and the security state a routable provider reports.
pub(super) fn attestation_response(
    shared: &Shared,
    challenge: AttestationChallenge,
) -> AttestationResponse {
    AttestationResponse {
        nonce: challenge.nonce,
        signature: String::new(),
        public_key: shared.public_key.clone(),
        hypervisor_active: Some(false),
        rdma_disabled: Some(true),
        sip_enabled: Some(true),
        secure_boot_enabled: Some(true),
        ..AttestationResponse::default()
    }
}
