use serde_json::{Value, json};

use super::*;

/// Parses a provider frame and unwraps the expected variant, or panics with what
/// was decoded instead.
macro_rules! parse_as {
    ($variant:ident, $text:expr) => {
        match ProviderMessage::parse($text) {
            Ok(ProviderMessage::$variant(message)) => message,
            other => panic!(
                "expected a {} message, got {:?}",
                stringify!($variant),
                other
            ),
        }
    };
}

/// Serializes a provider message and parses the output back into a JSON value.
fn provider_json(message: &ProviderMessage) -> Value {
    serde_json::from_str(&message.to_json()).expect("to_json returns valid JSON")
}

/// Serializes a coordinator message and parses the output back into a JSON value.
fn coordinator_json(message: &CoordinatorMessage) -> Value {
    serde_json::from_str(&message.to_json()).expect("to_json returns valid JSON")
}

// The inner attestation blob, exactly as it appears inside `REGISTER_FULL`. Its
// keys are deliberately out of alphabetical order, it contains spaces, and
// `publicKey` uses the `\/` escape, so any re-encoding would change its bytes.
const ATTESTATION_BLOB: &str = r#"{"timestamp":"2026-03-14T09:26:53Z", "publicKey":"QkxPQi1wdWJsaWMta2V5\/cG9pbnQ=","chipName":"Apple M4 Max","sipEnabled":true,"hardwareModel":"Mac16,5","osVersion":"15.4.1","authenticatedRootEnabled":true,"binaryHash":"0f1e2d3c","encryptionPublicKey":"eDI1NTE5LXByb3ZpZGVyLWtleS0zMi1ieXRlcy1hYQ==","rdmaDisabled":true,"secureBootEnabled":true,"secureEnclaveAvailable":true,"serialNumber":"C02TEST0001","systemVolumeHash":"a1b2c3"}"#;

// `register.attestation`, exactly as it appears inside `REGISTER_FULL`. Its
// signature comes before the blob, and the object contains a newline.
const SIGNED_ATTESTATION: &str = r#"{"signature":"MEUCIQDzc2lnbmF0dXJl\/Ynl0ZXM=",
    "attestation":{"timestamp":"2026-03-14T09:26:53Z", "publicKey":"QkxPQi1wdWJsaWMta2V5\/cG9pbnQ=","chipName":"Apple M4 Max","sipEnabled":true,"hardwareModel":"Mac16,5","osVersion":"15.4.1","authenticatedRootEnabled":true,"binaryHash":"0f1e2d3c","encryptionPublicKey":"eDI1NTE5LXByb3ZpZGVyLWtleS0zMi1ieXRlcy1hYQ==","rdmaDisabled":true,"secureBootEnabled":true,"secureEnclaveAvailable":true,"serialNumber":"C02TEST0001","systemVolumeHash":"a1b2c3"}}"#;

const REGISTER_FULL: &str = r#"{"type":"register",
  "hardware":{"machine_model":"Mac16,5","chip_name":"Apple M4 Max","chip_family":"M4","chip_tier":"Max","memory_gb":128,"memory_available_gb":119,"cpu_cores":{"total":16,"performance":12,"efficiency":4},"gpu_cores":40,"memory_bandwidth_gbs":546},
  "models":[
    {"id":"qwen3-8b-4bit","model_type":"qwen3","parameters":8000000000,"quantization":"4bit","size_bytes":4600000000,"estimated_memory_gb":5.5,"weight_hash":"9f2c71aa"},
    {"id":"mystery-model","model_type":null,"parameters":null,"quantization":null,"size_bytes":1024,"estimated_memory_gb":0.5,"family":"unknown","tags":["experimental"]}
  ],
  "backend":"inprocess-mlx",
  "version":"0.4.7",
  "public_key":"eDI1NTE5LXByb3ZpZGVyLWtleS0zMi1ieXRlcy1hYQ==",
  "encrypted_response_chunks":true,
  "wallet_address":"0x00000000000000000000000000000000000c0ffe",
  "attestation":{"signature":"MEUCIQDzc2lnbmF0dXJl\/Ynl0ZXM=",
    "attestation":{"timestamp":"2026-03-14T09:26:53Z", "publicKey":"QkxPQi1wdWJsaWMta2V5\/cG9pbnQ=","chipName":"Apple M4 Max","sipEnabled":true,"hardwareModel":"Mac16,5","osVersion":"15.4.1","authenticatedRootEnabled":true,"binaryHash":"0f1e2d3c","encryptionPublicKey":"eDI1NTE5LXByb3ZpZGVyLWtleS0zMi1ieXRlcy1hYQ==","rdmaDisabled":true,"secureBootEnabled":true,"secureEnclaveAvailable":true,"serialNumber":"C02TEST0001","systemVolumeHash":"a1b2c3"}},
  "prefill_tps":812.5,
  "decode_tps":64.25,
  "auth_token":"sy_pt_0123456789abcdef",
  "python_hash":"aa11",
  "runtime_hash":"bb22",
  "template_hashes":{"llama3":"dd44","chatml":"cc33"},
  "privacy_capabilities":{"text_backend_inprocess":true,"text_proxy_disabled":true,"python_runtime_locked":true,"dangerous_modules_blocked":true,"sip_enabled":true,"anti_debug_enabled":false,"core_dumps_disabled":true,"env_scrubbed":false,"hypervisor_active":true}
}"#;

const REGISTER_MINIMAL: &str =
    r#"{"type":"register","hardware":{},"models":[],"backend":"vllm_mlx"}"#;

const HEARTBEAT_FULL: &str = r#"{"type":"heartbeat","status":"serving",
  "active_model":"qwen3-8b-4bit",
  "warm_models":["qwen3-8b-4bit","gemma-3-4b"],
  "stats":{"requests_served":42,"tokens_generated":91234},
  "system_metrics":{"memory_pressure":0.375,"cpu_usage":0.125,"thermal_state":"fair"},
  "backend_capacity":{
    "slots":[
      {"model":"qwen3-8b-4bit","state":"running","num_running":2,"num_waiting":1,"active_tokens":5120,"max_tokens_potential":32768},
      {"model":"gemma-3-4b","state":"idle_shutdown","num_running":0,"num_waiting":0,"active_tokens":0,"max_tokens_potential":-1}
    ],
    "gpu_memory_active_gb":7.25,"gpu_memory_peak_gb":9.5,"gpu_memory_cache_gb":1.125,"total_memory_gb":128}
}"#;

const HEARTBEAT_MINIMAL: &str = r#"{"type":"heartbeat","status":"idle","active_model":null,"stats":{"requests_served":0,"tokens_generated":0}}"#;

const ATTESTATION_RESPONSE_FULL: &str = r#"{"type":"attestation_response",
  "nonce":"bm9uY2UtMzItYnl0ZXMtb2YtcmFuZG9tLWRhdGEtLS0=",
  "signature":"MEQCIGNoYWxsZW5nZQ==",
  "status_signature":"MEQCIHN0YXR1cw==",
  "public_key":"eDI1NTE5LXByb3ZpZGVyLWtleS0zMi1ieXRlcy1hYQ==",
  "hypervisor_active":false,
  "rdma_disabled":true,
  "sip_enabled":true,
  "secure_boot_enabled":true,
  "binary_hash":"0f1e2d3c",
  "active_model_hash":"9f2c71aa",
  "python_hash":"aa11",
  "runtime_hash":"bb22",
  "template_hashes":{"chatml":"cc33"},
  "model_hashes":{"qwen3-8b-4bit":"9f2c71aa","gemma-3-4b":"77e0"}
}"#;

const ATTESTATION_RESPONSE_MINIMAL: &str = r#"{"type":"attestation_response","nonce":"bm9uY2U="}"#;

fn string_map(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
        .collect()
}

#[test]
fn fixtures_contain_attestation_substrings() {
    // The byte-for-byte checks below compare against these constants, so they
    // must be copied exactly from the register fixture.
    assert!(REGISTER_FULL.contains(SIGNED_ATTESTATION));
    assert!(SIGNED_ATTESTATION.contains(ATTESTATION_BLOB));
}

#[test]
fn register_full_parses_every_field() {
    let register = parse_as!(Register, REGISTER_FULL);

    assert_eq!(register.hardware.machine_model, "Mac16,5");
    assert_eq!(register.hardware.chip_name, "Apple M4 Max");
    assert_eq!(register.hardware.chip_family, "M4");
    assert_eq!(register.hardware.chip_tier, "Max");
    assert_eq!(register.hardware.memory_gb, 128);
    assert_eq!(register.hardware.memory_available_gb, 119.0);
    assert_eq!(
        register.hardware.cpu_cores,
        CpuCores {
            total: 16,
            performance: 12,
            efficiency: 4
        }
    );
    assert_eq!(register.hardware.gpu_cores, 40);
    assert_eq!(register.hardware.memory_bandwidth_gbs, 546.0);

    assert_eq!(register.models.len(), 2);
    let known = &register.models[0];
    assert_eq!(known.id, "qwen3-8b-4bit");
    assert_eq!(known.model_type.as_deref(), Some("qwen3"));
    assert_eq!(known.parameters, Some(8_000_000_000));
    assert_eq!(known.quantization.as_deref(), Some("4bit"));
    assert_eq!(known.size_bytes, 4_600_000_000);
    assert_eq!(known.estimated_memory_gb, 5.5);
    assert_eq!(known.weight_hash.as_deref(), Some("9f2c71aa"));

    assert_eq!(register.backend, "inprocess-mlx");
    assert_eq!(register.version.as_deref(), Some("0.4.7"));
    assert_eq!(
        register.public_key.as_deref(),
        Some("eDI1NTE5LXByb3ZpZGVyLWtleS0zMi1ieXRlcy1hYQ==")
    );
    assert!(register.encrypted_response_chunks);
    assert_eq!(
        register.wallet_address.as_deref(),
        Some("0x00000000000000000000000000000000000c0ffe")
    );
    assert!(register.attestation.is_some());
    assert_eq!(register.prefill_tps, Some(812.5));
    assert_eq!(register.decode_tps, Some(64.25));
    assert_eq!(
        register.auth_token.as_deref(),
        Some("sy_pt_0123456789abcdef")
    );
    assert_eq!(register.python_hash.as_deref(), Some("aa11"));
    assert_eq!(register.runtime_hash.as_deref(), Some("bb22"));
    assert_eq!(
        register.template_hashes,
        string_map(&[("chatml", "cc33"), ("llama3", "dd44")])
    );
    assert_eq!(
        register.privacy_capabilities,
        Some(PrivacyCapabilities {
            text_backend_inprocess: true,
            text_proxy_disabled: true,
            python_runtime_locked: true,
            dangerous_modules_blocked: true,
            sip_enabled: true,
            anti_debug_enabled: false,
            core_dumps_disabled: true,
            env_scrubbed: false,
            hypervisor_active: true,
        })
    );
}

#[test]
fn register_model_accepts_nulls_and_extras() {
    let register = parse_as!(Register, REGISTER_FULL);
    let model = &register.models[1];

    assert_eq!(model.id, "mystery-model");
    assert_eq!(model.model_type, None);
    assert_eq!(model.parameters, None);
    assert_eq!(model.quantization, None);
    assert_eq!(model.size_bytes, 1024);
    assert_eq!(model.estimated_memory_gb, 0.5);
    assert_eq!(model.weight_hash, None);
}

#[test]
fn register_preserves_attestation_bytes() {
    let register = parse_as!(Register, REGISTER_FULL);
    let raw = register.attestation.expect("fixture has an attestation");

    assert_eq!(raw.get(), SIGNED_ATTESTATION);

    let signed = SignedAttestation::parse(&raw).expect("attestation object parses");
    assert_eq!(signed.attestation.get(), ATTESTATION_BLOB);
    assert!(signed.attestation.get().contains(r"\/"));
    assert_eq!(signed.signature, "MEUCIQDzc2lnbmF0dXJl/Ynl0ZXM=");
}

#[test]
fn attestation_blob_parses_camel_case() {
    let register = parse_as!(Register, REGISTER_FULL);
    let raw = register.attestation.expect("fixture has an attestation");
    let signed = SignedAttestation::parse(&raw).expect("attestation object parses");

    let blob: AttestationBlob =
        serde_json::from_str(signed.attestation.get()).expect("blob parses");

    assert!(blob.authenticated_root_enabled);
    assert_eq!(blob.binary_hash.as_deref(), Some("0f1e2d3c"));
    assert_eq!(blob.chip_name, "Apple M4 Max");
    assert_eq!(
        blob.encryption_public_key.as_deref(),
        Some("eDI1NTE5LXByb3ZpZGVyLWtleS0zMi1ieXRlcy1hYQ==")
    );
    assert_eq!(blob.hardware_model, "Mac16,5");
    assert_eq!(blob.os_version, "15.4.1");
    // The parsed value unescapes `\/`, but the raw bytes keep the escape.
    assert_eq!(blob.public_key, "QkxPQi1wdWJsaWMta2V5/cG9pbnQ=");
    assert!(blob.rdma_disabled);
    assert!(blob.secure_boot_enabled);
    assert!(blob.secure_enclave_available);
    assert_eq!(blob.serial_number.as_deref(), Some("C02TEST0001"));
    assert!(blob.sip_enabled);
    assert_eq!(blob.system_volume_hash.as_deref(), Some("a1b2c3"));
    assert_eq!(blob.timestamp, "2026-03-14T09:26:53Z");
}

#[test]
fn register_to_json_keeps_attestation_bytes() {
    let register = parse_as!(Register, REGISTER_FULL);
    let text = ProviderMessage::Register(register).to_json();

    assert!(
        text.contains(&format!(r#""attestation":{SIGNED_ATTESTATION}"#)),
        "attestation was re-encoded: {text}"
    );
}

#[test]
fn register_full_to_json() {
    let register = parse_as!(Register, REGISTER_FULL);
    let actual = provider_json(&ProviderMessage::Register(register));

    // Integers sent for float fields come back as floats, the unknown model
    // fields are dropped, and the nulls of the second model stay as nulls.
    let expected = json!({
        "type": "register",
        "hardware": {
            "machine_model": "Mac16,5",
            "chip_name": "Apple M4 Max",
            "chip_family": "M4",
            "chip_tier": "Max",
            "memory_gb": 128,
            "memory_available_gb": 119.0,
            "cpu_cores": {"total": 16, "performance": 12, "efficiency": 4},
            "gpu_cores": 40,
            "memory_bandwidth_gbs": 546.0
        },
        "models": [
            {
                "id": "qwen3-8b-4bit",
                "model_type": "qwen3",
                "parameters": 8_000_000_000_u64,
                "quantization": "4bit",
                "size_bytes": 4_600_000_000_u64,
                "estimated_memory_gb": 5.5,
                "weight_hash": "9f2c71aa"
            },
            {
                "id": "mystery-model",
                "model_type": null,
                "parameters": null,
                "quantization": null,
                "size_bytes": 1024,
                "estimated_memory_gb": 0.5
            }
        ],
        "backend": "inprocess-mlx",
        "version": "0.4.7",
        "public_key": "eDI1NTE5LXByb3ZpZGVyLWtleS0zMi1ieXRlcy1hYQ==",
        "encrypted_response_chunks": true,
        "wallet_address": "0x00000000000000000000000000000000000c0ffe",
        "attestation": {
            "signature": "MEUCIQDzc2lnbmF0dXJl/Ynl0ZXM=",
            "attestation": {
                "timestamp": "2026-03-14T09:26:53Z",
                "publicKey": "QkxPQi1wdWJsaWMta2V5/cG9pbnQ=",
                "chipName": "Apple M4 Max",
                "sipEnabled": true,
                "hardwareModel": "Mac16,5",
                "osVersion": "15.4.1",
                "authenticatedRootEnabled": true,
                "binaryHash": "0f1e2d3c",
                "encryptionPublicKey": "eDI1NTE5LXByb3ZpZGVyLWtleS0zMi1ieXRlcy1hYQ==",
                "rdmaDisabled": true,
                "secureBootEnabled": true,
                "secureEnclaveAvailable": true,
                "serialNumber": "C02TEST0001",
                "systemVolumeHash": "a1b2c3"
            }
        },
        "prefill_tps": 812.5,
        "decode_tps": 64.25,
        "auth_token": "sy_pt_0123456789abcdef",
        "python_hash": "aa11",
        "runtime_hash": "bb22",
        "template_hashes": {"chatml": "cc33", "llama3": "dd44"},
        "privacy_capabilities": {
            "text_backend_inprocess": true,
            "text_proxy_disabled": true,
            "python_runtime_locked": true,
            "dangerous_modules_blocked": true,
            "sip_enabled": true,
            "anti_debug_enabled": false,
            "core_dumps_disabled": true,
            "env_scrubbed": false,
            "hypervisor_active": true
        }
    });
    assert_eq!(actual, expected);
}

#[test]
fn register_minimal_uses_defaults() {
    let register = parse_as!(Register, REGISTER_MINIMAL);

    assert_eq!(register.hardware.machine_model, "");
    assert_eq!(register.hardware.memory_gb, 0);
    assert_eq!(register.hardware.memory_available_gb, 0.0);
    assert_eq!(register.hardware.cpu_cores, CpuCores::default());
    assert!(register.models.is_empty());
    assert_eq!(register.backend, "vllm_mlx");
    assert_eq!(register.version, None);
    assert_eq!(register.public_key, None);
    assert!(!register.encrypted_response_chunks);
    assert_eq!(register.wallet_address, None);
    assert!(register.attestation.is_none());
    assert_eq!(register.prefill_tps, None);
    assert_eq!(register.decode_tps, None);
    assert_eq!(register.auth_token, None);
    assert_eq!(register.python_hash, None);
    assert_eq!(register.runtime_hash, None);
    assert!(register.template_hashes.is_empty());
    assert_eq!(register.privacy_capabilities, None);
}

#[test]
fn register_null_attestation_is_none() {
    let register = parse_as!(
        Register,
        r#"{"type":"register","hardware":{},"models":[],"backend":"inprocess-mlx","attestation":null}"#
    );

    assert!(register.attestation.is_none());
}

#[test]
fn register_minimal_to_json_omits_absent() {
    let register = Register {
        hardware: Hardware {
            machine_model: "Mac15,8".to_owned(),
            chip_name: "Apple M3 Pro".to_owned(),
            chip_family: "M3".to_owned(),
            chip_tier: "Pro".to_owned(),
            memory_gb: 36,
            memory_available_gb: 30.5,
            cpu_cores: CpuCores {
                total: 12,
                performance: 6,
                efficiency: 6,
            },
            gpu_cores: 18,
            memory_bandwidth_gbs: 150.0,
        },
        models: vec![ModelInfo {
            id: "gemma-3-4b".to_owned(),
            size_bytes: 2048,
            estimated_memory_gb: 2.25,
            ..ModelInfo::default()
        }],
        backend: "inprocess-mlx".to_owned(),
        version: None,
        public_key: None,
        encrypted_response_chunks: false,
        wallet_address: None,
        attestation: None,
        prefill_tps: None,
        decode_tps: None,
        auth_token: None,
        python_hash: None,
        runtime_hash: None,
        template_hashes: BTreeMap::new(),
        privacy_capabilities: None,
    };

    let expected = json!({
        "type": "register",
        "hardware": {
            "machine_model": "Mac15,8",
            "chip_name": "Apple M3 Pro",
            "chip_family": "M3",
            "chip_tier": "Pro",
            "memory_gb": 36,
            "memory_available_gb": 30.5,
            "cpu_cores": {"total": 12, "performance": 6, "efficiency": 6},
            "gpu_cores": 18,
            "memory_bandwidth_gbs": 150.0
        },
        "models": [
            {
                "id": "gemma-3-4b",
                "model_type": null,
                "parameters": null,
                "quantization": null,
                "size_bytes": 2048,
                "estimated_memory_gb": 2.25
            }
        ],
        "backend": "inprocess-mlx"
    });
    assert_eq!(
        provider_json(&ProviderMessage::Register(register)),
        expected
    );
}

#[test]
fn heartbeat_full_parses_every_field() {
    let heartbeat = parse_as!(Heartbeat, HEARTBEAT_FULL);

    assert_eq!(heartbeat.status, ProviderStatus::Serving);
    assert_eq!(heartbeat.active_model.as_deref(), Some("qwen3-8b-4bit"));
    assert_eq!(heartbeat.warm_models, ["qwen3-8b-4bit", "gemma-3-4b"]);
    assert_eq!(
        heartbeat.stats,
        ProviderStats {
            requests_served: 42,
            tokens_generated: 91234
        }
    );
    assert_eq!(
        heartbeat.system_metrics,
        Some(SystemMetrics {
            memory_pressure: 0.375,
            cpu_usage: 0.125,
            thermal_state: ThermalState::Fair,
        })
    );
    assert_eq!(
        heartbeat.backend_capacity,
        Some(BackendCapacity {
            slots: vec![
                BackendSlotCapacity {
                    model: "qwen3-8b-4bit".to_owned(),
                    state: BackendSlotState::Running,
                    num_running: 2,
                    num_waiting: 1,
                    active_tokens: 5120,
                    max_tokens_potential: 32768,
                },
                BackendSlotCapacity {
                    model: "gemma-3-4b".to_owned(),
                    state: BackendSlotState::IdleShutdown,
                    num_running: 0,
                    num_waiting: 0,
                    active_tokens: 0,
                    max_tokens_potential: -1,
                },
            ],
            gpu_memory_active_gb: 7.25,
            gpu_memory_peak_gb: 9.5,
            gpu_memory_cache_gb: 1.125,
            total_memory_gb: 128.0,
        })
    );
}

#[test]
fn heartbeat_full_to_json() {
    let heartbeat = parse_as!(Heartbeat, HEARTBEAT_FULL);

    let expected = json!({
        "type": "heartbeat",
        "status": "serving",
        "active_model": "qwen3-8b-4bit",
        "warm_models": ["qwen3-8b-4bit", "gemma-3-4b"],
        "stats": {"requests_served": 42, "tokens_generated": 91234},
        "system_metrics": {"memory_pressure": 0.375, "cpu_usage": 0.125, "thermal_state": "fair"},
        "backend_capacity": {
            "slots": [
                {
                    "model": "qwen3-8b-4bit",
                    "state": "running",
                    "num_running": 2,
                    "num_waiting": 1,
                    "active_tokens": 5120,
                    "max_tokens_potential": 32768
                },
                {
                    "model": "gemma-3-4b",
                    "state": "idle_shutdown",
                    "num_running": 0,
                    "num_waiting": 0,
                    "active_tokens": 0,
                    "max_tokens_potential": -1
                }
            ],
            "gpu_memory_active_gb": 7.25,
            "gpu_memory_peak_gb": 9.5,
            "gpu_memory_cache_gb": 1.125,
            "total_memory_gb": 128.0
        }
    });
    assert_eq!(
        provider_json(&ProviderMessage::Heartbeat(heartbeat)),
        expected
    );
}

#[test]
fn heartbeat_minimal_parses_null_model() {
    let heartbeat = parse_as!(Heartbeat, HEARTBEAT_MINIMAL);

    assert_eq!(heartbeat.status, ProviderStatus::Idle);
    assert_eq!(heartbeat.active_model, None);
    assert!(heartbeat.warm_models.is_empty());
    assert_eq!(heartbeat.stats, ProviderStats::default());
    assert_eq!(heartbeat.system_metrics, None);
    assert_eq!(heartbeat.backend_capacity, None);
}

#[test]
fn heartbeat_minimal_to_json_omits_absent() {
    let heartbeat = parse_as!(Heartbeat, HEARTBEAT_MINIMAL);

    // `active_model` is omitted, not written as null, as the provider does.
    let expected = json!({
        "type": "heartbeat",
        "status": "idle",
        "stats": {"requests_served": 0, "tokens_generated": 0}
    });
    assert_eq!(
        provider_json(&ProviderMessage::Heartbeat(heartbeat)),
        expected
    );
}

#[test]
fn heartbeat_without_stats_defaults() {
    let heartbeat = parse_as!(Heartbeat, r#"{"type":"heartbeat","status":"idle"}"#);

    assert_eq!(heartbeat.stats, ProviderStats::default());
    assert_eq!(heartbeat.active_model, None);
}

#[test]
fn inference_accepted_round_trip() {
    let text =
        r#"{"type":"inference_accepted","request_id":"5d6f3a0e-9a7b-4c1d-8e2f-0123456789ab"}"#;

    let accepted = parse_as!(InferenceAccepted, text);
    assert_eq!(
        accepted,
        InferenceAccepted {
            request_id: "5d6f3a0e-9a7b-4c1d-8e2f-0123456789ab".to_owned()
        }
    );

    let expected = json!({
        "type": "inference_accepted",
        "request_id": "5d6f3a0e-9a7b-4c1d-8e2f-0123456789ab"
    });
    assert_eq!(
        provider_json(&ProviderMessage::InferenceAccepted(accepted)),
        expected
    );
}

#[test]
fn encrypted_chunk_round_trip() {
    let text = r#"{"type":"inference_response_chunk","request_id":"req-1","encrypted_data":{"ephemeral_public_key":"cHJvdmlkZXIteDI1NTE5LWtleQ==","ciphertext":"bm9uY2UyNGJ5dGVzKyszYm94"}}"#;

    let chunk = parse_as!(InferenceResponseChunk, text);
    assert_eq!(
        chunk,
        InferenceResponseChunk {
            request_id: "req-1".to_owned(),
            data: None,
            encrypted_data: Some(EncryptedPayload {
                ephemeral_public_key: "cHJvdmlkZXIteDI1NTE5LWtleQ==".to_owned(),
                ciphertext: "bm9uY2UyNGJ5dGVzKyszYm94".to_owned(),
            }),
        }
    );

    let expected = json!({
        "type": "inference_response_chunk",
        "request_id": "req-1",
        "encrypted_data": {
            "ephemeral_public_key": "cHJvdmlkZXIteDI1NTE5LWtleQ==",
            "ciphertext": "bm9uY2UyNGJ5dGVzKyszYm94"
        }
    });
    assert_eq!(
        provider_json(&ProviderMessage::InferenceResponseChunk(chunk)),
        expected
    );
}

#[test]
fn plaintext_chunk_parses_data() {
    let text = r#"{"type":"inference_response_chunk","request_id":"req-2","data":"data: [DONE]"}"#;

    let chunk = parse_as!(InferenceResponseChunk, text);

    assert_eq!(chunk.request_id, "req-2");
    assert_eq!(chunk.data.as_deref(), Some("data: [DONE]"));
    assert_eq!(chunk.encrypted_data, None);
}

#[test]
fn inference_complete_with_signature() {
    let text = r#"{"type":"inference_complete","request_id":"req-3","usage":{"prompt_tokens":128,"completion_tokens":512},"se_signature":"MEUCIQCcb21wbGV0ZQ==","response_hash":"e3b0c442"}"#;

    let complete = parse_as!(InferenceComplete, text);
    assert_eq!(
        complete,
        InferenceComplete {
            request_id: "req-3".to_owned(),
            usage: Usage {
                prompt_tokens: 128,
                completion_tokens: 512,
            },
            se_signature: Some("MEUCIQCcb21wbGV0ZQ==".to_owned()),
            response_hash: Some("e3b0c442".to_owned()),
        }
    );

    let expected = json!({
        "type": "inference_complete",
        "request_id": "req-3",
        "usage": {"prompt_tokens": 128, "completion_tokens": 512},
        "se_signature": "MEUCIQCcb21wbGV0ZQ==",
        "response_hash": "e3b0c442"
    });
    assert_eq!(
        provider_json(&ProviderMessage::InferenceComplete(complete)),
        expected
    );
}

#[test]
fn inference_complete_without_signature() {
    let text = r#"{"type":"inference_complete","request_id":"req-4","usage":{"prompt_tokens":7,"completion_tokens":0},"response_hash":"00ff"}"#;

    let complete = parse_as!(InferenceComplete, text);
    assert_eq!(complete.request_id, "req-4");
    assert_eq!(
        complete.usage,
        Usage {
            prompt_tokens: 7,
            completion_tokens: 0
        }
    );
    assert_eq!(complete.se_signature, None);
    assert_eq!(complete.response_hash.as_deref(), Some("00ff"));

    let expected = json!({
        "type": "inference_complete",
        "request_id": "req-4",
        "usage": {"prompt_tokens": 7, "completion_tokens": 0},
        "response_hash": "00ff"
    });
    assert_eq!(
        provider_json(&ProviderMessage::InferenceComplete(complete)),
        expected
    );
}

#[test]
fn inference_error_round_trip() {
    let text = r#"{"type":"inference_error","request_id":"req-5","error":"no backend slot for model","status_code":404}"#;

    let error = parse_as!(InferenceError, text);
    assert_eq!(
        error,
        InferenceError {
            request_id: "req-5".to_owned(),
            error: "no backend slot for model".to_owned(),
            status_code: 404,
        }
    );

    let expected = json!({
        "type": "inference_error",
        "request_id": "req-5",
        "error": "no backend slot for model",
        "status_code": 404
    });
    assert_eq!(
        provider_json(&ProviderMessage::InferenceError(error)),
        expected
    );
}

#[test]
fn attestation_response_full_parses() {
    let response = parse_as!(AttestationResponse, ATTESTATION_RESPONSE_FULL);

    assert_eq!(
        response,
        AttestationResponse {
            nonce: "bm9uY2UtMzItYnl0ZXMtb2YtcmFuZG9tLWRhdGEtLS0=".to_owned(),
            signature: "MEQCIGNoYWxsZW5nZQ==".to_owned(),
            status_signature: Some("MEQCIHN0YXR1cw==".to_owned()),
            public_key: "eDI1NTE5LXByb3ZpZGVyLWtleS0zMi1ieXRlcy1hYQ==".to_owned(),
            hypervisor_active: Some(false),
            rdma_disabled: Some(true),
            sip_enabled: Some(true),
            secure_boot_enabled: Some(true),
            binary_hash: Some("0f1e2d3c".to_owned()),
            active_model_hash: Some("9f2c71aa".to_owned()),
            python_hash: Some("aa11".to_owned()),
            runtime_hash: Some("bb22".to_owned()),
            template_hashes: string_map(&[("chatml", "cc33")]),
            model_hashes: string_map(&[("gemma-3-4b", "77e0"), ("qwen3-8b-4bit", "9f2c71aa")]),
        }
    );
}

#[test]
fn attestation_response_full_to_json() {
    let response = parse_as!(AttestationResponse, ATTESTATION_RESPONSE_FULL);

    let expected = json!({
        "type": "attestation_response",
        "nonce": "bm9uY2UtMzItYnl0ZXMtb2YtcmFuZG9tLWRhdGEtLS0=",
        "signature": "MEQCIGNoYWxsZW5nZQ==",
        "status_signature": "MEQCIHN0YXR1cw==",
        "public_key": "eDI1NTE5LXByb3ZpZGVyLWtleS0zMi1ieXRlcy1hYQ==",
        "hypervisor_active": false,
        "rdma_disabled": true,
        "sip_enabled": true,
        "secure_boot_enabled": true,
        "binary_hash": "0f1e2d3c",
        "active_model_hash": "9f2c71aa",
        "python_hash": "aa11",
        "runtime_hash": "bb22",
        "template_hashes": {"chatml": "cc33"},
        "model_hashes": {"gemma-3-4b": "77e0", "qwen3-8b-4bit": "9f2c71aa"}
    });
    assert_eq!(
        provider_json(&ProviderMessage::AttestationResponse(response)),
        expected
    );
}

#[test]
fn attestation_response_minimal_defaults() {
    let response = parse_as!(AttestationResponse, ATTESTATION_RESPONSE_MINIMAL);

    assert_eq!(
        response,
        AttestationResponse {
            nonce: "bm9uY2U=".to_owned(),
            ..AttestationResponse::default()
        }
    );
    assert_eq!(response.signature, "");
    assert_eq!(response.public_key, "");

    // `signature` and `public_key` are always written, as empty strings when absent.
    let expected = json!({
        "type": "attestation_response",
        "nonce": "bm9uY2U=",
        "signature": "",
        "public_key": ""
    });
    assert_eq!(
        provider_json(&ProviderMessage::AttestationResponse(response)),
        expected
    );
}

#[test]
fn provider_parse_ignores_unknown_fields() {
    let text = r#"{"type":"heartbeat","status":"idle","uptime_secs":99,"stats":{"requests_served":1,"tokens_generated":2,"errors":3},"system_metrics":{"memory_pressure":0.5,"cpu_usage":0.25,"thermal_state":"nominal","gpu_usage":0.75}}"#;

    let heartbeat = parse_as!(Heartbeat, text);

    assert_eq!(
        heartbeat.stats,
        ProviderStats {
            requests_served: 1,
            tokens_generated: 2
        }
    );
    assert_eq!(
        heartbeat.system_metrics,
        Some(SystemMetrics {
            memory_pressure: 0.5,
            cpu_usage: 0.25,
            thermal_state: ThermalState::Nominal,
        })
    );
}

#[test]
fn provider_parse_unknown_type() {
    let result = ProviderMessage::parse(r#"{"type":"telemetry_batch","events":[]}"#);

    match result {
        Err(ProtocolError::UnknownType(kind)) => assert_eq!(kind, "telemetry_batch"),
        other => panic!("expected UnknownType, got {other:?}"),
    }
}

#[test]
fn provider_parse_coordinator_type_is_unknown() {
    // A coordinator message echoed back by a provider is not a provider message.
    let result = ProviderMessage::parse(r#"{"type":"cancel","request_id":"req-1"}"#);

    match result {
        Err(ProtocolError::UnknownType(kind)) => assert_eq!(kind, "cancel"),
        other => panic!("expected UnknownType, got {other:?}"),
    }
}

#[test]
fn provider_parse_missing_type() {
    let cases = [
        "not json",
        "",
        "[]",
        r#""heartbeat""#,
        r#"{"status":"idle"}"#,
        r#"{"type":7}"#,
        r#"{"type":null}"#,
        r#"{"type":"heartbeat""#,
    ];

    for text in cases {
        match ProviderMessage::parse(text) {
            Err(ProtocolError::MissingType(_)) => {}
            other => panic!("expected MissingType for {text:?}, got {other:?}"),
        }
    }
}

#[test]
fn provider_parse_missing_required_field() {
    let cases = [
        (
            r#"{"type":"register","hardware":{},"models":[]}"#,
            "register",
        ),
        (
            r#"{"type":"register","models":[],"backend":"x"}"#,
            "register",
        ),
        (r#"{"type":"heartbeat","active_model":"m"}"#, "heartbeat"),
        (r#"{"type":"inference_accepted"}"#, "inference_accepted"),
        (
            r#"{"type":"inference_response_chunk","data":"x"}"#,
            "inference_response_chunk",
        ),
        (
            r#"{"type":"inference_complete","request_id":"r"}"#,
            "inference_complete",
        ),
        (
            r#"{"type":"inference_complete","request_id":"r","usage":{"prompt_tokens":1}}"#,
            "inference_complete",
        ),
        (
            r#"{"type":"inference_error","request_id":"r","error":"boom"}"#,
            "inference_error",
        ),
        (
            r#"{"type":"attestation_response","signature":""}"#,
            "attestation_response",
        ),
    ];

    for (text, expected_kind) in cases {
        match ProviderMessage::parse(text) {
            Err(ProtocolError::InvalidMessage { kind, .. }) => {
                assert_eq!(kind, expected_kind, "wrong kind for {text}");
            }
            other => panic!("expected InvalidMessage for {text}, got {other:?}"),
        }
    }
}

#[test]
fn invalid_message_error_names_kind() {
    let error = ProviderMessage::parse(r#"{"type":"inference_accepted"}"#)
        .expect_err("request_id is required");

    assert_eq!(error.to_string(), "invalid `inference_accepted` message");
}

#[test]
fn provider_parse_wrong_field_type() {
    let result = ProviderMessage::parse(
        r#"{"type":"inference_error","request_id":"r","error":"e","status_code":"500"}"#,
    );

    match result {
        Err(ProtocolError::InvalidMessage { kind, .. }) => assert_eq!(kind, "inference_error"),
        other => panic!("expected InvalidMessage, got {other:?}"),
    }
}

#[test]
fn integers_accepted_for_float_fields() {
    let register = parse_as!(
        Register,
        r#"{"type":"register","hardware":{"memory_available_gb":64,"memory_bandwidth_gbs":400},"models":[{"id":"m","estimated_memory_gb":6}],"backend":"inprocess-mlx"}"#
    );
    assert_eq!(register.hardware.memory_available_gb, 64.0);
    assert_eq!(register.hardware.memory_bandwidth_gbs, 400.0);
    assert_eq!(register.models[0].estimated_memory_gb, 6.0);

    let heartbeat = parse_as!(
        Heartbeat,
        r#"{"type":"heartbeat","status":"idle","backend_capacity":{"slots":[],"gpu_memory_active_gb":1,"total_memory_gb":96}}"#
    );
    let capacity = heartbeat.backend_capacity.expect("fixture has capacity");
    assert_eq!(capacity.total_memory_gb, 96.0);
    assert_eq!(capacity.gpu_memory_active_gb, 1.0);
}

#[test]
fn unknown_enum_strings_map_to_unknown() {
    let text = r#"{"type":"heartbeat","status":"draining","system_metrics":{"memory_pressure":0,"cpu_usage":0,"thermal_state":"throttled"},"backend_capacity":{"slots":[{"model":"m","state":"warming"}]}}"#;

    let heartbeat = parse_as!(Heartbeat, text);

    assert_eq!(heartbeat.status, ProviderStatus::Unknown);
    let metrics = heartbeat.system_metrics.expect("fixture has metrics");
    assert_eq!(metrics.thermal_state, ThermalState::Unknown);
    let capacity = heartbeat.backend_capacity.expect("fixture has capacity");
    assert_eq!(capacity.slots[0].state, BackendSlotState::Unknown);
}

#[test]
fn known_enum_strings_parse() {
    let thermal = [
        ("nominal", ThermalState::Nominal),
        ("fair", ThermalState::Fair),
        ("serious", ThermalState::Serious),
        ("critical", ThermalState::Critical),
    ];
    for (text, expected) in thermal {
        let parsed: ThermalState = serde_json::from_value(json!(text)).expect("known state");
        assert_eq!(parsed, expected, "thermal state {text}");
    }

    let slot = [
        ("running", BackendSlotState::Running),
        ("idle", BackendSlotState::Idle),
        ("idle_shutdown", BackendSlotState::IdleShutdown),
        ("crashed", BackendSlotState::Crashed),
        ("reloading", BackendSlotState::Reloading),
    ];
    for (text, expected) in slot {
        let parsed: BackendSlotState = serde_json::from_value(json!(text)).expect("known state");
        assert_eq!(parsed, expected, "slot state {text}");
    }
}

#[test]
fn inference_request_exact_json() {
    let message = CoordinatorMessage::InferenceRequest(InferenceRequest {
        request_id: "0b8e7c1a-2f3d-4e5f-9a6b-7c8d9e0f1a2b".to_owned(),
        encrypted_body: EncryptedPayload {
            ephemeral_public_key: "Y29vcmRpbmF0b3ItZXBoZW1lcmFsLWtleQ==".to_owned(),
            ciphertext: "bm9uY2UtYW5kLWJveA==".to_owned(),
        },
    });

    let text = message.to_json();
    assert_eq!(
        text,
        r#"{"type":"inference_request","request_id":"0b8e7c1a-2f3d-4e5f-9a6b-7c8d9e0f1a2b","encrypted_body":{"ephemeral_public_key":"Y29vcmRpbmF0b3ItZXBoZW1lcmFsLWtleQ==","ciphertext":"bm9uY2UtYW5kLWJveA=="}}"#
    );

    let value = coordinator_json(&message);
    assert!(
        value.get("body").is_none(),
        "plaintext body was sent: {text}"
    );

    assert_eq!(
        CoordinatorMessage::parse(&text).expect("round trip"),
        message
    );
}

#[test]
fn cancel_round_trip() {
    let message = CoordinatorMessage::Cancel(Cancel {
        request_id: "req-9".to_owned(),
    });

    let expected = json!({"type": "cancel", "request_id": "req-9"});
    assert_eq!(coordinator_json(&message), expected);

    let parsed = CoordinatorMessage::parse(&message.to_json()).expect("round trip");
    assert_eq!(parsed, message);
}

#[test]
fn attestation_challenge_round_trip() {
    let message = CoordinatorMessage::AttestationChallenge(AttestationChallenge {
        nonce: "Y2hhbGxlbmdlLW5vbmNlLTMyLWJ5dGVzLWxvbmctLS0=".to_owned(),
        timestamp: "2026-05-01T10:00:00Z".to_owned(),
    });

    let expected = json!({
        "type": "attestation_challenge",
        "nonce": "Y2hhbGxlbmdlLW5vbmNlLTMyLWJ5dGVzLWxvbmctLS0=",
        "timestamp": "2026-05-01T10:00:00Z"
    });
    assert_eq!(coordinator_json(&message), expected);

    let parsed = CoordinatorMessage::parse(&message.to_json()).expect("round trip");
    assert_eq!(parsed, message);
}

#[test]
fn runtime_status_with_mismatches() {
    let message = CoordinatorMessage::RuntimeStatus(RuntimeStatus {
        verified: false,
        mismatches: vec![
            RuntimeMismatch {
                component: "python".to_owned(),
                expected: "one of known-good hashes".to_owned(),
                got: "aa11".to_owned(),
            },
            RuntimeMismatch {
                component: "template:chatml".to_owned(),
                expected: "cc33".to_owned(),
                got: "(missing)".to_owned(),
            },
        ],
    });

    let expected = json!({
        "type": "runtime_status",
        "verified": false,
        "mismatches": [
            {"component": "python", "expected": "one of known-good hashes", "got": "aa11"},
            {"component": "template:chatml", "expected": "cc33", "got": "(missing)"}
        ]
    });
    assert_eq!(coordinator_json(&message), expected);

    let parsed = CoordinatorMessage::parse(&message.to_json()).expect("round trip");
    assert_eq!(parsed, message);
}

#[test]
fn runtime_status_omits_empty_mismatches() {
    let message = CoordinatorMessage::RuntimeStatus(RuntimeStatus {
        verified: true,
        mismatches: Vec::new(),
    });

    let expected = json!({"type": "runtime_status", "verified": true});
    assert_eq!(coordinator_json(&message), expected);

    let parsed = CoordinatorMessage::parse(&message.to_json()).expect("round trip");
    assert_eq!(parsed, message);
}

#[test]
fn coordinator_parse_rejects_unknown_type() {
    assert!(CoordinatorMessage::parse(r#"{"type":"heartbeat","status":"idle"}"#).is_err());
    assert!(CoordinatorMessage::parse("not json").is_err());
}

#[test]
fn coordinator_parse_ignores_unknown_fields() {
    let parsed = CoordinatorMessage::parse(
        r#"{"type":"cancel","request_id":"req-7","reason":"consumer disconnected"}"#,
    )
    .expect("unknown fields are ignored");

    assert_eq!(
        parsed,
        CoordinatorMessage::Cancel(Cancel {
            request_id: "req-7".to_owned()
        })
    );
}
