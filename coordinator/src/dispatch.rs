//! Running one consumer request: placement, sealed dispatch, failover before the
//! commit point, relaying chunks after it, and settlement.
//!
//! The commit point is the first chunk that carries content. Before it, a failed
//! attempt (error, disconnect, timeout, invalid chunk) moves the request to another
//! provider, up to `max_attempts` in all, each with a fresh request id and key
//! pair. After it, a provider failure ends the answer with an error and no charge.
//!
//! Billing: a completed request is charged for the usage the provider reported,
//! capped by the request's own limits and by the hold, and the charge commits
//! before the final event is sent. A consumer that disconnects after content is
//! charged for the prompt (the node's estimate) and the content chunks delivered;
//! one that disconnects before content is not charged.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{Value, json};
use switchyard_shared::api::{ApiError, ErrorKind};
use switchyard_shared::catalog::ModelEntry;
use switchyard_shared::ids::{AccountId, ConsumerRequestId, ProviderId, RequestId};
use switchyard_shared::ledger::{LedgerError, Outcome, Settlement, SettlementReceipt};
use switchyard_shared::money::MicroUsd;
use switchyard_shared::protocol::{
    Cancel, CoordinatorMessage, InferenceRequest, InferenceResponseChunk, Usage,
};
use switchyard_shared::seal::KeyPair;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::node::NodeState;
use crate::provider::{Outbound, ProviderEvent, ProviderHandle};
use crate::request::ChatRequest;
use crate::scheduler::{PlacementError, SlotGuard};
use crate::translate::{self, ProviderLine, ResponseIdentity};

/// How the answer starts, sent once to the HTTP handler.
pub enum Start {
    /// Nothing was sent to the consumer and nothing is charged.
    Failed {
        error: ApiError,
        /// The node has no provider for the model; the router may try another node.
        retry_elsewhere: bool,
    },
    /// A committed streaming answer: formatted SSE events.
    Stream(mpsc::Receiver<Bytes>),
    /// A complete, settled non-streaming answer.
    Json(Value),
}

/// One consumer request whose hold is already placed.
pub struct Job {
    pub node: Arc<NodeState>,
    pub request_id: ConsumerRequestId,
    pub account_id: AccountId,
    pub entry: ModelEntry,
    pub request: ChatRequest,
    pub hold: MicroUsd,
    /// Cancelled when the consumer goes away.
    pub consumer_gone: CancellationToken,
}

/// Events relayed to a streaming consumer before it must wait.
const STREAM_BUFFER: usize = 64;

/// Why an attempt did not reach the commit point.
enum AttemptError {
    ConsumerGone,
    Failed {
        provider: ProviderId,
        failure: Failure,
    },
}

/// A provider-side failure, as the consumer will hear of it.
#[derive(Debug, Clone)]
struct Failure {
    kind: ErrorKind,
    message: String,
}

impl Failure {
    fn provider(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::ProviderError,
            message: message.into(),
        }
    }

    fn timeout(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Timeout,
            message: message.into(),
        }
    }
}

/// An attempt that reached the commit point.
struct Committed {
    slot: SlotGuard,
    attempt: Attempt,
    /// Chunks received up to and including the committing one.
    buffered: Vec<Value>,
    /// Set when the provider completed before sending any content.
    completed: Option<Usage>,
}

/// The keys and channel of one dispatch attempt.
struct Attempt {
    id: RequestId,
    keys: KeyPair,
    events: mpsc::UnboundedReceiver<ProviderEvent>,
    provider: Arc<ProviderHandle>,
}

impl Attempt {
    /// Stops listening and tells the provider to stop. The pending entry goes
    /// first, so late messages for this id are dropped rather than billed.
    fn abandon(&self) {
        self.provider.forget_request(&self.id);
        let cancel = CoordinatorMessage::Cancel(Cancel {
            request_id: self.id.to_string(),
        });
        self.provider.try_send(Outbound::Message(cancel));
    }
}

/// Runs the job to its end and reports how the answer starts through `start`.
pub async fn run(job: Job, start: oneshot::Sender<Start>) {
    let started = Instant::now();
    let committed = match dispatch_until_commit(&job).await {
        Ok(committed) => committed,
        Err(error) => {
            release_hold(&job).await;
            let outcome = match &error {
                Some(Start::Failed { error, .. }) => error.kind.code(),
                _ => "consumer_disconnected",
            };
            job.node.metrics.requests.increment(&[("outcome", outcome)]);
            if let Some(start_error) = error {
                let _ = start.send(start_error);
            }
            return;
        }
    };

    let outcome = if job.request.stream {
        relay_stream(&job, committed, start).await
    } else {
        collect_answer(&job, committed, start).await
    };
    job.node.metrics.requests.increment(&[("outcome", outcome)]);
    debug!(
        duration_ms = started.elapsed().as_millis() as u64,
        "request finished"
    );
}

/// Places and dispatches attempts until one commits. `Err(None)` means the
/// consumer left; `Err(Some(start))` is the failure to report.
async fn dispatch_until_commit(job: &Job) -> Result<Committed, Option<Start>> {
    let config = &job.node.config;
    let model = &job.entry.id;
    let plaintext = serde_json::to_vec(&job.request.body).map_err(|_| {
        Some(Start::Failed {
            error: ApiError::new(ErrorKind::Internal, "request could not be encoded"),
            retry_elsewhere: false,
        })
    })?;

    let mut excluded: Vec<ProviderId> = Vec::new();
    let mut last_failure: Option<Failure> = None;
    for attempt_number in 1..=config.max_attempts {
        let placement = tokio::select! {
            _ = job.consumer_gone.cancelled() => return Err(None),
            placement = job.node.scheduler.place(model, &excluded, config.queue_timeout) => placement,
        };
        let slot = match placement {
            Ok(slot) => slot,
            Err(error) => return Err(Some(placement_failure(error, last_failure, attempt_number))),
        };

        match attempt(job, slot, &plaintext).await {
            Ok(committed) => return Ok(committed),
            Err(AttemptError::ConsumerGone) => return Err(None),
            Err(AttemptError::Failed { provider, failure }) => {
                job.node
                    .metrics
                    .attempt_failures
                    .increment(&[("reason", failure.kind.code())]);
                warn!(
                    provider.id = %provider,
                    attempt = attempt_number,
                    reason = %failure.message,
                    "dispatch attempt failed before the first content chunk"
                );
                excluded.push(provider);
                last_failure = Some(failure);
            }
        }
    }

    let failure = last_failure.unwrap_or_else(|| Failure::provider("no attempt was made"));
    Err(Some(Start::Failed {
        error: ApiError::new(
            failure.kind,
            format!(
                "inference failed after {} attempts: {}",
                config.max_attempts, failure.message
            ),
        ),
        retry_elsewhere: false,
    }))
}

fn placement_failure(
    error: PlacementError,
    last_failure: Option<Failure>,
    attempt_number: u32,
) -> Start {
    match (error, last_failure) {
        (PlacementError::NoProviders, None) => Start::Failed {
            error: ApiError::new(ErrorKind::NoCapacity, "no provider is serving this model")
                .with_retry_after(5),
            retry_elsewhere: true,
        },
        (PlacementError::NoProviders, Some(failure)) => Start::Failed {
            error: ApiError::new(
                failure.kind,
                format!(
                    "inference failed after {} attempts: {}",
                    attempt_number - 1,
                    failure.message
                ),
            ),
            retry_elsewhere: false,
        },
        (PlacementError::QueueFull, _) => Start::Failed {
            error: ApiError::new(
                ErrorKind::NoCapacity,
                "every provider of this model is busy and its queue is full",
            )
            .with_retry_after(1),
            retry_elsewhere: false,
        },
        (PlacementError::QueueTimeout, _) => Start::Failed {
            error: ApiError::new(
                ErrorKind::NoCapacity,
                "timed out waiting for a free provider",
            )
            .with_retry_after(5),
            retry_elsewhere: false,
        },
    }
}

/// Sends the sealed request to the slot's provider and waits for the commit point.
async fn attempt(job: &Job, slot: SlotGuard, plaintext: &[u8]) -> Result<Committed, AttemptError> {
    let config = &job.node.config;
    let provider = slot.provider().clone();
    let failed = |failure: Failure| AttemptError::Failed {
        provider: provider.id,
        failure,
    };
    let Some(provider_key) = provider.public_key.as_ref() else {
        return Err(failed(Failure::provider("provider has no encryption key")));
    };

    let id = RequestId::generate();
    let keys = KeyPair::generate();
    let events = provider.register_request(id.clone());
    let mut attempt = Attempt {
        id: id.clone(),
        keys,
        events,
        provider: provider.clone(),
    };

    let sealed = attempt.keys.seal(provider_key, plaintext);
    let request = CoordinatorMessage::InferenceRequest(InferenceRequest {
        request_id: id.to_string(),
        encrypted_body: sealed,
    });
    if !provider.send(Outbound::Message(request)).await {
        provider.forget_request(&id);
        return Err(failed(Failure::provider("provider disconnected")));
    }
    debug!(provider.id = %provider.id, attempt.id = %id, "inference request sent");

    let mut buffered = Vec::new();
    let mut deadline = tokio::time::Instant::now() + config.first_response_timeout;
    loop {
        let event = tokio::select! {
            _ = job.consumer_gone.cancelled() => {
                attempt.abandon();
                return Err(AttemptError::ConsumerGone);
            }
            event = tokio::time::timeout_at(deadline, attempt.events.recv()) => event,
        };

        match event {
            Err(_) => {
                attempt.abandon();
                return Err(failed(Failure::timeout("provider did not answer in time")));
            }
            Ok(None | Some(ProviderEvent::Disconnected)) => {
                return Err(failed(Failure::provider("provider disconnected")));
            }
            Ok(Some(ProviderEvent::Accepted)) => {
                deadline = tokio::time::Instant::now() + config.response_timeout;
            }
            Ok(Some(ProviderEvent::Error {
                status_code,
                message,
            })) => {
                provider.forget_request(&id);
                return Err(failed(Failure::provider(format!(
                    "provider error {status_code}: {message}"
                ))));
            }
            Ok(Some(ProviderEvent::Complete(usage))) => {
                provider.forget_request(&id);
                return Ok(Committed {
                    slot,
                    attempt,
                    buffered,
                    completed: Some(usage),
                });
            }
            Ok(Some(ProviderEvent::Chunk(chunk))) => {
                let line = match open_chunk(&job.node, &attempt, &chunk) {
                    Ok(line) => line,
                    Err(failure) => {
                        attempt.abandon();
                        return Err(failed(failure));
                    }
                };
                deadline = tokio::time::Instant::now() + config.response_timeout;
                if let ProviderLine::Json(value) = line {
                    let commits = translate::carries_content(&value);
                    buffered.push(value);
                    if commits {
                        return Ok(Committed {
                            slot,
                            attempt,
                            buffered,
                            completed: None,
                        });
                    }
                }
            }
        }
    }
}

/// Opens a response chunk. A plaintext or undecryptable chunk marks the provider
/// untrusted: an honest provider never sends one.
fn open_chunk(
    node: &NodeState,
    attempt: &Attempt,
    chunk: &InferenceResponseChunk,
) -> Result<ProviderLine, Failure> {
    let provider = &attempt.provider;
    let result = (|| {
        if chunk.data.as_ref().is_some_and(|data| !data.is_empty()) {
            return Err("provider sent a plaintext chunk");
        }
        let payload = chunk
            .encrypted_data
            .as_ref()
            .ok_or("provider sent a chunk without encrypted_data")?;
        if payload.ephemeral_public_key != provider.public_key_base64 {
            return Err("chunk sender key differs from the registered key");
        }
        let sender = provider
            .public_key
            .as_ref()
            .ok_or("provider has no registered key")?;
        let plaintext = attempt
            .keys
            .open(sender, &payload.ciphertext)
            .map_err(|_| "chunk could not be decrypted")?;
        let text = String::from_utf8(plaintext).map_err(|_| "chunk is not UTF-8")?;
        translate::parse_line(&text).map_err(|_| "chunk is not an SSE data line")
    })();

    result.map_err(|reason| {
        provider.mark_untrusted();
        node.refresh_provider(provider);
        warn!(provider.id = %provider.id, reason, "provider returned an invalid chunk and is now untrusted");
        Failure::provider("provider returned an invalid encrypted chunk")
    })
}

/// What ended the relay of a committed answer.
enum End {
    Completed(Usage),
    ConsumerGone,
    ProviderFailed(Failure),
}

fn identity(job: &Job) -> ResponseIdentity {
    ResponseIdentity {
        id: format!("chatcmpl-{}", job.request_id),
        model: job.request.model.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs()),
    }
}

/// Streams a committed answer to its end; returns how it ended, as a metrics label.
async fn relay_stream(
    job: &Job,
    mut committed: Committed,
    start: oneshot::Sender<Start>,
) -> &'static str {
    let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
    if start.send(Start::Stream(receiver)).is_err() {
        committed.attempt.abandon();
        release_hold(job).await;
        return "consumer_disconnected";
    }

    let identity = identity(job);
    let mut delivered = 0u64;
    let mut end = None;
    for chunk in std::mem::take(&mut committed.buffered) {
        if !forward(&sender, chunk, &identity, &mut delivered).await {
            end = Some(End::ConsumerGone);
            break;
        }
    }
    let end = match (end, committed.completed) {
        (Some(end), _) => end,
        (None, Some(usage)) => End::Completed(usage),
        (None, None) => loop {
            match next_chunk(job, &mut committed.attempt).await {
                Next::Chunk(chunk) => {
                    if !forward(&sender, chunk, &identity, &mut delivered).await {
                        break End::ConsumerGone;
                    }
                }
                Next::End(end) => break end,
            }
        },
    };

    let outcome = match end {
        End::Completed(reported) => match settle(
            job,
            &committed.attempt.provider,
            reported,
            Outcome::Completed,
        )
        .await
        {
            Ok(billed) => {
                if job.request.include_usage {
                    let _ = sender
                        .send(translate::sse_event(&translate::usage_chunk(
                            &identity, billed,
                        )))
                        .await;
                }
                let _ = sender.send(Bytes::from_static(translate::SSE_DONE)).await;
                "completed"
            }
            Err(error) => {
                let _ = sender.send(error_event(&error)).await;
                "settlement_failed"
            }
        },
        End::ConsumerGone => {
            committed.attempt.abandon();
            let usage = Usage {
                prompt_tokens: job.request.prompt_estimate,
                completion_tokens: delivered,
            };
            if delivered == 0 {
                release_hold(job).await;
            } else if let Err(error) = settle(
                job,
                &committed.attempt.provider,
                usage,
                Outcome::ConsumerDisconnected,
            )
            .await
            {
                debug!(error = %error.message, "settlement after disconnect failed");
            }
            info!(
                completion_tokens = delivered,
                "consumer disconnected during the stream"
            );
            "consumer_disconnected"
        }
        End::ProviderFailed(failure) => {
            committed.attempt.abandon();
            release_hold(job).await;
            warn!(provider.id = %committed.attempt.provider.id, reason = %failure.message, "provider failed after the first content chunk");
            let error = ApiError::new(failure.kind, failure.message);
            let _ = sender.send(error_event(&error)).await;
            "provider_failed"
        }
    };
    drop(committed.slot);
    outcome
}

/// Sends one chunk to a streaming consumer. Returns false once the consumer is gone.
async fn forward(
    sender: &mpsc::Sender<Bytes>,
    chunk: Value,
    identity: &ResponseIdentity,
    delivered: &mut u64,
) -> bool {
    let content = translate::carries_content(&chunk);
    let Some(rewritten) = translate::rewrite_chunk(chunk, identity) else {
        return true;
    };
    if sender.send(translate::sse_event(&rewritten)).await.is_err() {
        return false;
    }
    if content {
        *delivered += 1;
    }
    true
}

/// What the next message of a committed attempt brings.
enum Next {
    Chunk(Value),
    End(End),
}

/// Reads a committed attempt up to its next JSON chunk or its end.
async fn next_chunk(job: &Job, attempt: &mut Attempt) -> Next {
    let timeout = job.node.config.response_timeout;
    loop {
        let event = tokio::select! {
            _ = job.consumer_gone.cancelled() => return Next::End(End::ConsumerGone),
            event = tokio::time::timeout(timeout, attempt.events.recv()) => event,
        };
        let end = match event {
            Err(_) => End::ProviderFailed(Failure::timeout("request timed out")),
            Ok(None | Some(ProviderEvent::Disconnected)) => {
                End::ProviderFailed(Failure::provider("provider disconnected"))
            }
            Ok(Some(ProviderEvent::Accepted)) => continue,
            Ok(Some(ProviderEvent::Error {
                status_code,
                message,
            })) => End::ProviderFailed(Failure::provider(format!(
                "provider error {status_code}: {message}"
            ))),
            Ok(Some(ProviderEvent::Complete(usage))) => {
                attempt.provider.forget_request(&attempt.id);
                End::Completed(usage)
            }
            Ok(Some(ProviderEvent::Chunk(chunk))) => match open_chunk(&job.node, attempt, &chunk) {
                Err(failure) => End::ProviderFailed(failure),
                Ok(ProviderLine::Done) => continue,
                Ok(ProviderLine::Json(value)) => return Next::Chunk(value),
            },
        };
        return Next::End(end);
    }
}

/// Collects and sends a committed non-streaming answer; returns how it ended, as
/// a metrics label.
async fn collect_answer(
    job: &Job,
    mut committed: Committed,
    start: oneshot::Sender<Start>,
) -> &'static str {
    let mut chunks = std::mem::take(&mut committed.buffered);
    let end = match committed.completed {
        Some(usage) => End::Completed(usage),
        None => loop {
            match next_chunk(job, &mut committed.attempt).await {
                Next::Chunk(chunk) => chunks.push(chunk),
                Next::End(end) => break end,
            }
        },
    };

    let (start_with, outcome) = match end {
        End::Completed(reported) => {
            match settle(
                job,
                &committed.attempt.provider,
                reported,
                Outcome::Completed,
            )
            .await
            {
                Ok(billed) => (
                    Start::Json(translate::assemble_completion(
                        &chunks,
                        &identity(job),
                        billed,
                    )),
                    "completed",
                ),
                Err(error) => (
                    Start::Failed {
                        error,
                        retry_elsewhere: false,
                    },
                    "settlement_failed",
                ),
            }
        }
        End::ConsumerGone => {
            // Nothing of a non-streaming answer reached the consumer: no charge.
            committed.attempt.abandon();
            release_hold(job).await;
            return "consumer_disconnected";
        }
        End::ProviderFailed(failure) => {
            committed.attempt.abandon();
            release_hold(job).await;
            warn!(provider.id = %committed.attempt.provider.id, reason = %failure.message, "provider failed after the first content chunk");
            let start_with = Start::Failed {
                error: ApiError::new(failure.kind, failure.message),
                retry_elsewhere: false,
            };
            (start_with, "provider_failed")
        }
    };
    let _ = start.send(start_with);
    drop(committed.slot);
    outcome
}

/// Charges the request. Reported usage is capped by the request's own bounds, and
/// the ledger caps the cost at the hold. Returns the usage that was billed.
async fn settle(
    job: &Job,
    provider: &ProviderHandle,
    reported: Usage,
    outcome: Outcome,
) -> Result<Usage, ApiError> {
    let usage = Usage {
        prompt_tokens: reported.prompt_tokens.min(job.request.prompt_limit),
        completion_tokens: reported
            .completion_tokens
            .min(job.request.completion_limit()),
    };
    if usage != reported {
        warn!(
            provider.id = %provider.id,
            reported_prompt_tokens = reported.prompt_tokens,
            reported_completion_tokens = reported.completion_tokens,
            "provider reported usage beyond the request's bounds; capped"
        );
    }

    let settlement = Settlement {
        request_id: job.request_id.clone(),
        model: job.entry.id.clone(),
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cost: job
            .entry
            .prices()
            .cost(usage.prompt_tokens, usage.completion_tokens),
        platform_fee_bps: job.node.catalog.platform_fee_bps(),
        provider_account: provider.account.clone(),
        provider_key: provider.public_key_base64.clone(),
        node_id: job.node.config.node_id.clone(),
        outcome,
    };
    match settle_with_retry(job, settlement).await {
        Ok(receipt) => {
            log_settlement(&receipt, usage);
            Ok(usage)
        }
        Err(error) => {
            job.node
                .metrics
                .ledger_errors
                .increment(&[("operation", "settle")]);
            error!(error = %error, "settlement failed; the hold stays open");
            Err(settlement_error(&error))
        }
    }
}

/// Settles, retrying while the ledger is unavailable for up to the configured
/// window. Settlement is idempotent, so a retry after an attempt whose commit
/// went through but whose answer was lost returns the first receipt.
async fn settle_with_retry(
    job: &Job,
    settlement: Settlement,
) -> Result<SettlementReceipt, LedgerError> {
    let deadline = tokio::time::Instant::now() + job.node.config.settle_retry_window;
    let mut delay = std::time::Duration::from_millis(100);
    loop {
        match job.node.ledger.settle(settlement.clone()).await {
            Err(LedgerError::Unavailable(error))
                if tokio::time::Instant::now() + delay < deadline =>
            {
                warn!(error = %error, retry_in_ms = delay.as_millis() as u64, "settlement failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
            result => return result,
        }
    }
}

fn log_settlement(receipt: &SettlementReceipt, usage: Usage) {
    info!(
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        charged_micro_usd = receipt.charged.get(),
        provider_earning_micro_usd = receipt.provider_earning.get(),
        "request settled"
    );
}

fn settlement_error(error: &LedgerError) -> ApiError {
    match error {
        LedgerError::Unavailable(_) => ApiError::new(
            ErrorKind::Unavailable,
            "billing is unavailable; the request was not charged",
        )
        .with_retry_after(5),
        _ => ApiError::new(ErrorKind::Internal, "the request could not be billed"),
    }
}

async fn release_hold(job: &Job) {
    if let Err(error) = job.node.ledger.release(&job.request_id).await {
        job.node
            .metrics
            .ledger_errors
            .increment(&[("operation", "release")]);
        error!(error = %error, "failed to release a hold; the sweeper will release it");
    }
}

/// The SSE event that ends a stream after a failure: an OpenAI error object and no
/// `[DONE]`.
fn error_event(error: &ApiError) -> Bytes {
    translate::sse_event(&json!(error.body()))
}
