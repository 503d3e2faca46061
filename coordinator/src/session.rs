//! One provider's WebSocket session on a node.
//!
//! The session reads `register`, creates the [`ProviderHandle`], adds it to the
//! scheduler, and then runs one loop that reads frames, evicts the provider when
//! heartbeats stop, and sends attestation challenges. All writes go through one
//! writer task fed by a channel, because a WebSocket sink has a single owner.
//!
//! The loop is written over `Sink`/`Stream` of axum messages, so tests drive it
//! with in-memory channels.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message};
use base64::Engine as _;
use futures::{Sink, SinkExt, Stream, StreamExt};
use rand::RngCore;
use switchyard_shared::ids::ModelId;
use switchyard_shared::ledger::SecretHash;
use switchyard_shared::protocol::{
    AttestationChallenge, AttestationResponse, CoordinatorMessage, ProviderMessage, Register,
};
use switchyard_shared::seal::PeerKey;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::TrustLevel;
use crate::node::NodeState;
use crate::provider::{NewProvider, Outbound, ProviderEvent, ProviderHandle};

/// WebSocket close codes a node sends to providers.
pub mod close_code {
    /// Normal end, for example when the node shuts down.
    pub const NORMAL: u16 = 1000;
    /// The first frame was not a valid `register`.
    pub const POLICY: u16 = 1008;
    /// No heartbeat within the eviction timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4000;
    /// The node is shutting down; reconnect through a router.
    pub const GOING_AWAY: u16 = 1001;
    /// The provider's home is now another node; reconnect through a router.
    pub const REHOME: u16 = 4001;
}

/// Time a new connection has to send `register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued for a provider before senders wait.
const OUTBOUND_CAPACITY: usize = 256;
/// Consecutive failed challenges after which a provider is untrusted.
const MAX_CHALLENGE_FAILURES: u32 = 3;

/// Runs a provider session until the socket closes, the provider is evicted, or
/// the node shuts down.
pub async fn run_session<S, R, E>(node: Arc<NodeState>, sink: S, mut stream: R)
where
    S: Sink<Message> + Unpin + Send + 'static,
    R: Stream<Item = Result<Message, E>> + Unpin + Send,
    E: std::fmt::Display,
{
    let (outbound, outbound_receiver) = mpsc::channel(OUTBOUND_CAPACITY);
    let writer = tokio::spawn(write_frames(sink, outbound_receiver));

    let register = match tokio::time::timeout(REGISTER_TIMEOUT, read_register(&mut stream)).await {
        Ok(Ok(register)) => register,
        Ok(Err(reason)) => {
            info!(reason, "provider connection closed before registering");
            let _ = outbound
                .send(Outbound::Close(close_code::POLICY, reason))
                .await;
            drop(outbound);
            let _ = writer.await;
            return;
        }
        Err(_) => {
            info!("provider sent no register frame in time");
            let _ = outbound
                .send(Outbound::Close(close_code::POLICY, "register timed out"))
                .await;
            drop(outbound);
            let _ = writer.await;
            return;
        }
    };

    let provider = Arc::new(register_provider(&node, register, outbound).await);
    let span =
        info_span!("provider_session", provider.id = %provider.id, node.id = %node.config.node_id);

    async {
        node.add_provider(&provider);
        info!(models = ?provider.models, routable = provider.is_routable(), "provider registered");

        read_frames(&node, &provider, &mut stream).await;

        node.remove_provider(&provider);
        provider.session_token.cancel();
        provider.fail_all_pending();
        info!("provider session ended");
    }
    .instrument(span)
    .await;

    drop(provider);
    let _ = writer.await;
}

async fn read_register<R, E>(stream: &mut R) -> Result<Register, &'static str>
where
    R: Stream<Item = Result<Message, E>> + Unpin,
{
    loop {
        let frame = match stream.next().await {
            Some(Ok(frame)) => frame,
            Some(Err(_)) | None => return Err("socket closed"),
        };
        let text = match frame {
            Message::Text(text) => text,
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Binary(_) => return Err("first frame must be a text register message"),
            Message::Close(_) => return Err("socket closed"),
        };
        return match ProviderMessage::parse(text.as_str()) {
            Ok(ProviderMessage::Register(register)) => Ok(register),
            Ok(_) => Err("first message must be register"),
            Err(_) => Err("invalid register message"),
        };
    }
}

/// Builds the provider's handle from its registration: keeps catalog models only,
/// validates the key and links the provider token to an account.
async fn register_provider(
    node: &NodeState,
    register: Register,
    outbound: mpsc::Sender<Outbound>,
) -> ProviderHandle {
    let public_key_base64 = register.public_key.clone().unwrap_or_default();
    let public_key = PeerKey::from_base64(&public_key_base64).ok();
    if public_key.is_none() {
        warn!("provider registered without a valid X25519 public_key; it will not be routable");
    }
    if !register.encrypted_response_chunks {
        warn!("provider does not encrypt response chunks; it will not be routable");
    }

    let models = if public_key.is_some() && register.encrypted_response_chunks {
        catalog_models(node, &register)
    } else {
        Vec::new()
    };

    let account = match &register.auth_token {
        Some(token) => match node.ledger.provider_account(SecretHash::of(token)).await {
            Ok(Some(account)) => Some(account),
            Ok(None) => {
                warn!("provider token is invalid or revoked; earnings stay unlinked");
                None
            }
            Err(error) => {
                warn!(error = %error, "provider token lookup failed; earnings stay unlinked");
                None
            }
        },
        None => None,
    };

    if let Err(error) = node
        .ledger
        .record_provider(&public_key_base64, account.as_ref())
        .await
    {
        warn!(error = %error, "failed to record the provider in the ledger");
    }

    // TODO: verify the Secure Enclave attestation and challenge signatures; until
    // then every provider has trust level none and `min_trust` above none routes
    // nothing.
    let trust = TrustLevel::None;
    let meets_min_trust = trust >= node.config.min_trust;
    if !meets_min_trust {
        warn!(min_trust = ?node.config.min_trust, "provider is below the minimum trust level; it will not be routable");
    }

    ProviderHandle::new(NewProvider {
        models,
        public_key,
        public_key_base64,
        account,
        decode_tps: register.decode_tps,
        meets_min_trust,
        outbound,
        session_token: node.shutdown.child_token(),
    })
}

/// Keeps the registered models that are enabled in the catalog and whose weight
/// hash, when both sides give one, matches.
fn catalog_models(node: &NodeState, register: &Register) -> Vec<ModelId> {
    let mut models = Vec::new();
    for model in &register.models {
        let Some(entry) = node.catalog.get(&model.id) else {
            debug!(model = %model.id, "ignoring model that is not in the catalog");
            continue;
        };
        let hash_mismatch = matches!(
            (&entry.weight_hash, &model.weight_hash),
            (Some(expected), Some(reported)) if !expected.is_empty() && !reported.is_empty() && expected != reported
        );
        if hash_mismatch {
            warn!(model = %model.id, "ignoring model whose weight hash differs from the catalog");
            continue;
        }
        if !models.contains(&entry.id) {
            models.push(entry.id.clone());
        }
    }
    models
}

struct PendingChallenge {
    nonce: String,
    deadline: Instant,
}

async fn read_frames<R, E>(node: &NodeState, provider: &ProviderHandle, stream: &mut R)
where
    R: Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    let config = &node.config;
    let mut eviction_check = tokio::time::interval(config.heartbeat_timeout / 3);
    let mut challenge_tick = tokio::time::interval(config.challenge_interval);
    let mut challenge: Option<PendingChallenge> = None;
    let mut challenge_failures = 0u32;

    loop {
        let challenge_deadline = challenge.as_ref().map(|pending| pending.deadline);
        tokio::select! {
            _ = provider.session_token.cancelled() => {
                let (code, reason) = provider.close_frame().unwrap_or((close_code::GOING_AWAY, "node shutting down"));
                let _ = provider.try_send(Outbound::Close(code, reason));
                return;
            }
            frame = stream.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None => return,
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => {
                        debug!(error = %error, "provider socket failed");
                        return;
                    }
                };
                match ProviderMessage::parse(text.as_str()) {
                    Ok(ProviderMessage::AttestationResponse(response)) => {
                        let Some(pending) = challenge.take_if(|pending| pending.nonce == response.nonce) else {
                            debug!("ignoring attestation response for an unknown nonce");
                            continue;
                        };
                        drop(pending);
                        let verdict = check_challenge(provider, &response);
                        record_challenge(provider, verdict, &mut challenge_failures);
                        node.refresh_provider(provider);
                    }
                    Ok(message) => handle_message(node, provider, message),
                    Err(error) => debug!(error = %error, "ignoring undecodable provider message"),
                }
            }
            _ = eviction_check.tick() => {
                if provider.heartbeat_age() > config.heartbeat_timeout {
                    warn!(timeout_secs = config.heartbeat_timeout.as_secs(), "evicting provider after missed heartbeats");
                    let _ = provider.try_send(Outbound::Close(close_code::HEARTBEAT_TIMEOUT, "heartbeat timeout"));
                    return;
                }
            }
            // An untrusted provider stays untrusted until it reconnects, so it is
            // not challenged any more.
            _ = challenge_tick.tick(), if challenge.is_none() && !provider.is_untrusted() => {
                let (nonce, message) = new_challenge();
                if provider.send(Outbound::Message(message)).await {
                    challenge = Some(PendingChallenge { nonce, deadline: Instant::now() + config.challenge_timeout });
                }
            }
            _ = sleep_until_option(challenge_deadline) => {
                challenge = None;
                record_challenge(provider, ChallengeVerdict::Failed("challenge timed out"), &mut challenge_failures);
                node.refresh_provider(provider);
            }
        }
    }
}

async fn sleep_until_option(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn handle_message(node: &NodeState, provider: &ProviderHandle, message: ProviderMessage) {
    match message {
        ProviderMessage::Heartbeat(heartbeat) => {
            provider.record_heartbeat(&heartbeat);
            node.refresh_provider(provider);
        }
        ProviderMessage::InferenceAccepted(accepted) => {
            provider.deliver(&accepted.request_id, ProviderEvent::Accepted);
        }
        ProviderMessage::InferenceResponseChunk(chunk) => {
            let request_id = chunk.request_id.clone();
            provider.deliver(&request_id, ProviderEvent::Chunk(chunk));
        }
        ProviderMessage::InferenceComplete(complete) => {
            provider.deliver(
                &complete.request_id,
                ProviderEvent::Complete(complete.usage),
            );
        }
        ProviderMessage::InferenceError(error) => {
            provider.deliver(
                &error.request_id,
                ProviderEvent::Error {
                    status_code: error.status_code,
                    message: error.error,
                },
            );
        }
        ProviderMessage::Register(_) => {
            debug!("ignoring a second register on the same connection");
        }
        ProviderMessage::AttestationResponse(_) => {}
    }
}

fn new_challenge() -> (String, CoordinatorMessage) {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let nonce = base64::engine::general_purpose::STANDARD.encode(bytes);
    let message = CoordinatorMessage::AttestationChallenge(AttestationChallenge {
        nonce: nonce.clone(),
        timestamp: rfc3339_now(),
    });
    (nonce, message)
}

#[derive(Debug, PartialEq, Eq)]
enum ChallengeVerdict {
    Passed,
    /// Counts toward the consecutive-failure limit.
    Failed(&'static str),
    /// The provider reported a state that can never be trusted.
    Untrusted(&'static str),
}

/// Checks a challenge response's status fields and key binding.
///
/// NOTE: the signatures are not verified yet (see the attestation TODO in
/// `register_provider`), so a response passes on its reported status alone.
fn check_challenge(provider: &ProviderHandle, response: &AttestationResponse) -> ChallengeVerdict {
    if !provider.public_key_base64.is_empty() && response.public_key != provider.public_key_base64 {
        return ChallengeVerdict::Failed("public key differs from the registered one");
    }
    match response.sip_enabled {
        None => return ChallengeVerdict::Failed("sip_enabled missing"),
        Some(false) => return ChallengeVerdict::Untrusted("System Integrity Protection disabled"),
        Some(true) => {}
    }
    if response.secure_boot_enabled == Some(false) {
        return ChallengeVerdict::Untrusted("secure boot disabled");
    }
    match response.rdma_disabled {
        None => return ChallengeVerdict::Failed("rdma_disabled missing"),
        Some(false) if response.hypervisor_active != Some(true) => {
            return ChallengeVerdict::Untrusted("RDMA enabled without a hypervisor");
        }
        Some(_) => {}
    }
    ChallengeVerdict::Passed
}

fn record_challenge(provider: &ProviderHandle, verdict: ChallengeVerdict, failures: &mut u32) {
    match verdict {
        ChallengeVerdict::Passed => {
            *failures = 0;
            provider.set_challenge_failed(false);
            debug!("attestation challenge passed");
        }
        ChallengeVerdict::Failed(reason) => {
            *failures += 1;
            provider.set_challenge_failed(true);
            warn!(reason, failures = *failures, "attestation challenge failed");
            if *failures >= MAX_CHALLENGE_FAILURES {
                provider.mark_untrusted();
                warn!("provider untrusted after consecutive challenge failures");
            }
        }
        ChallengeVerdict::Untrusted(reason) => {
            *failures += 1;
            provider.set_challenge_failed(true);
            provider.mark_untrusted();
            warn!(reason, "provider untrusted after its challenge response");
        }
    }
}

/// Writes queued frames until the channel closes or a close frame is written.
async fn write_frames<S>(mut sink: S, mut frames: mpsc::Receiver<Outbound>)
where
    S: Sink<Message> + Unpin,
{
    while let Some(frame) = frames.recv().await {
        let message = match frame {
            Outbound::Message(message) => Message::Text(message.to_json().into()),
            Outbound::Close(code, reason) => {
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code,
                        reason: reason.into(),
                    })))
                    .await;
                break;
            }
        };
        if sink.send(message).await.is_err() {
            break;
        }
    }
    let _ = sink.close().await;
}

/// Formats the current UTC time as RFC 3339 with second precision.
fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    format_rfc3339(secs)
}

fn format_rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs_of_day = unix_secs % 86_400;

    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);

    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs_of_day / 3_600,
        secs_of_day % 3_600 / 60,
        secs_of_day % 60
    )
}

#[cfg(test)]
mod tests;
