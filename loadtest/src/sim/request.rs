//! One inference request: open the sealed body, accept, then generate and seal the
//! response chunks according to the provider's [`Behavior`].

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use switchyard_shared::protocol::{
    EncryptedPayload, InferenceAccepted, InferenceComplete, InferenceError, InferenceRequest,
    InferenceResponseChunk, ProviderMessage, Usage,
};
use switchyard_shared::seal::{PeerKey, SealError};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::completion::{ChatRequest, DONE_LINE, ResponseLines, response_hash};
use super::session::Outbound;
use super::{ActiveRequest, Behavior, Shared, lock};

#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("invalid coordinator public key: {0}")]
    InvalidPeerKey(SealError),
    #[error("failed to open the body: {0}")]
    Seal(SealError),
    // The JSON error is left out because its text could quote the plaintext.
    #[error("body is not JSON")]
    NotJson,
}

/// Opens `inference`'s body and, if it opens, spawns the task that responds to it. A
/// body that does not open is dropped without a reply, as the provider agent does,
/// so the coordinator's first-response timeout handles it.
pub(super) fn start(
    shared: &Arc<Shared>,
    inference: InferenceRequest,
    outbound: &mpsc::Sender<Outbound>,
    tasks: &mut JoinSet<()>,
) {
    shared.update_stats(|stats| stats.requests_received += 1);
    let request_id = inference.request_id;

    let (peer, body) = match open_body(shared, &inference.encrypted_body) {
        Ok(opened) => opened,
        Err(error) => {
            tracing::warn!(
                request.id = %request_id,
                %error,
                "dropped an inference request that could not be opened"
            );
            shared.update_stats(|stats| stats.requests_undecryptable += 1);
            return;
        }
    };
    let chat = ChatRequest::from_json(&body, shared.config.completion_tokens);
    drop(body);

    let cancel = CancellationToken::new();
    if !track(shared, &request_id, &chat.model, &cancel) {
        tracing::warn!(
            request.id = %request_id,
            "ignored a second inference request with an id already in flight"
        );
        return;
    }
    let guard = ActiveGuard {
        shared: Arc::clone(shared),
        request_id: request_id.clone(),
    };

    let span = tracing::info_span!("inference", request.id = %request_id, model = %chat.model);
    let generation = Generation {
        shared: Arc::clone(shared),
        behavior: shared.behavior(),
        lines: ResponseLines::new(&request_id, &chat.model, unix_seconds()),
        request_id,
        peer,
        chat,
        outbound: outbound.clone(),
        cancel,
        content_chunks_sent: 0,
    };
    tasks.spawn(
        async move {
            let _guard = guard;
            generation.run().await;
        }
        .instrument(span),
    );
}

/// Stops generating `request_id`. Returns whether the request was in flight.
pub(super) fn cancel(shared: &Shared, request_id: &str) -> bool {
    let active = lock(&shared.active);
    let Some(request) = active.get(request_id) else {
        return false;
    };
    request.cancel.cancel();
    true
}

fn open_body(shared: &Shared, sealed: &EncryptedPayload) -> Result<(PeerKey, Value), OpenError> {
    let peer =
        PeerKey::from_base64(&sealed.ephemeral_public_key).map_err(OpenError::InvalidPeerKey)?;
    let plaintext = shared
        .key_pair
        .open(&peer, &sealed.ciphertext)
        .map_err(OpenError::Seal)?;
    let body = serde_json::from_slice(&plaintext).map_err(|_| OpenError::NotJson)?;
    Ok((peer, body))
}

/// Records the request as in flight. Returns false if its id already is.
fn track(shared: &Shared, request_id: &str, model: &str, cancel: &CancellationToken) -> bool {
    let mut active = lock(&shared.active);
    if active.contains_key(request_id) {
        return false;
    }
    active.insert(
        request_id.to_owned(),
        ActiveRequest {
            model: model.to_owned(),
            cancel: cancel.clone(),
        },
    );
    // Updated under the lock so that concurrent inserts and removals publish their
    // counts in the order they happened.
    let in_flight = active.len() as u64;
    shared.update_stats(|stats| stats.in_flight = in_flight);
    drop(active);

    if !model.is_empty() {
        *lock(&shared.last_model) = Some(model.to_owned());
    }
    true
}

/// Removes a request from the in-flight set when its task ends, also when the task
/// is aborted because the connection ended.
struct ActiveGuard {
    shared: Arc<Shared>,
    request_id: String,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        let mut active = lock(&self.shared.active);
        active.remove(&self.request_id);
        let in_flight = active.len() as u64;
        self.shared
            .update_stats(|stats| stats.in_flight = in_flight);
    }
}

/// Reason a response ended before `inference_complete`.
enum Stop {
    Cancelled,
    /// The connection was dropped on purpose.
    Dropped,
    /// The connection ended, so nothing more can be sent.
    ConnectionGone,
}

struct Generation {
    shared: Arc<Shared>,
    request_id: String,
    /// The coordinator's per-request key, which every chunk is sealed to.
    peer: PeerKey,
    chat: ChatRequest,
    behavior: Behavior,
    lines: ResponseLines,
    outbound: mpsc::Sender<Outbound>,
    cancel: CancellationToken,
    content_chunks_sent: u64,
}

impl Generation {
    async fn run(mut self) {
        match self.respond().await {
            Ok(()) | Err(Stop::Dropped | Stop::ConnectionGone) => {}
            Err(Stop::Cancelled) => {
                tracing::info!(
                    content_chunks_sent = self.content_chunks_sent,
                    "stopped generating after cancel"
                );
                self.shared
                    .update_stats(|stats| stats.stopped_by_cancel += 1);
            }
        }
    }

    async fn respond(&mut self) -> Result<(), Stop> {
        let accepted = InferenceAccepted {
            request_id: self.request_id.clone(),
        };
        self.send(ProviderMessage::InferenceAccepted(accepted))
            .await?;

        if !self.serves_model() {
            let error = format!("no backend slot for model `{}`", self.chat.model);
            return self.send_error(404, error).await;
        }

        match self.behavior {
            Behavior::FailBeforeFirstChunk { status_code } => {
                let error = "simulated failure before the first chunk".to_owned();
                return self.send_error(status_code, error).await;
            }
            Behavior::Stall => {
                self.cancel.cancelled().await;
                return Err(Stop::Cancelled);
            }
            Behavior::Normal | Behavior::DropAfterChunks(_) | Behavior::PlaintextChunks => {}
        }

        let response_body = if self.chat.stream {
            self.stream().await?
        } else {
            self.respond_whole().await?
        };

        if matches!(self.behavior, Behavior::DropAfterChunks(_)) {
            return Err(self.drop_connection().await);
        }
        self.complete(&response_body).await
    }

    /// Sends the role chunk, one chunk per token, the finish chunk, an optional
    /// usage chunk and `[DONE]`. Returns the concatenated chunk plaintexts without
    /// `[DONE]`, which the response hash covers.
    async fn stream(&mut self) -> Result<String, Stop> {
        let mut response_body = String::new();
        let started = Instant::now();

        let role = self.lines.role_chunk();
        self.send_chunk(&role).await?;
        response_body.push_str(&role);

        for index in 0..self.chat.completion_tokens {
            if self.drop_due() {
                return Err(self.drop_connection().await);
            }
            self.pace(started, index + 1).await?;

            let token = self.lines.token_chunk(index);
            self.send_chunk(&token).await?;
            self.content_chunks_sent += 1;
            response_body.push_str(&token);
        }
        if self.drop_due() {
            return Err(self.drop_connection().await);
        }

        let finish = self.lines.finish_chunk();
        self.send_chunk(&finish).await?;
        response_body.push_str(&finish);

        if self.chat.include_usage {
            let usage = self
                .lines
                .usage_chunk(self.chat.prompt_tokens, self.chat.completion_tokens);
            self.send_chunk(&usage).await?;
            response_body.push_str(&usage);
        }

        self.send_chunk(DONE_LINE).await?;
        Ok(response_body)
    }

    /// Waits as long as generating every token takes, then sends the whole
    /// `chat.completion` as one chunk and returns its plaintext.
    async fn respond_whole(&mut self) -> Result<String, Stop> {
        let started = Instant::now();
        self.pace(started, self.chat.completion_tokens).await?;
        if self.drop_due() {
            return Err(self.drop_connection().await);
        }

        let completion = self
            .lines
            .completion(self.chat.prompt_tokens, self.chat.completion_tokens);
        self.send_chunk(&completion).await?;
        self.content_chunks_sent += 1;
        Ok(completion)
    }

    async fn complete(&mut self, response_body: &str) -> Result<(), Stop> {
        let completion_tokens = self.chat.completion_tokens;
        // NOTE: the provider agent hashes max(engine token count, chunk count),
        // which for a stream exceeds the token count by the role and finish chunks.
        // The simulation hashes the token count it reports in `usage`.
        let complete = InferenceComplete {
            request_id: self.request_id.clone(),
            usage: Usage {
                prompt_tokens: self.chat.prompt_tokens,
                completion_tokens,
            },
            se_signature: None,
            response_hash: Some(response_hash(
                &self.request_id,
                completion_tokens,
                response_body,
            )),
        };

        // Counted before sending, so a test that reads `inference_complete` off the
        // wire reads counters that include it.
        self.shared.update_stats(|stats| {
            stats.completed += 1;
            stats.tokens_generated += completion_tokens;
        });
        self.send(ProviderMessage::InferenceComplete(complete))
            .await?;
        tracing::debug!(
            prompt_tokens = self.chat.prompt_tokens,
            completion_tokens,
            "completed inference request"
        );
        Ok(())
    }

    async fn send_error(&mut self, status_code: i64, error: String) -> Result<(), Stop> {
        tracing::info!(status_code, error = %error, "sending inference_error");
        let message = InferenceError {
            request_id: self.request_id.clone(),
            error,
            status_code,
        };
        self.shared.update_stats(|stats| stats.errors_sent += 1);
        self.send(ProviderMessage::InferenceError(message)).await
    }

    /// Matches the request's model to a configured one by exact id or, as the
    /// provider agent does, by one id containing the other.
    fn serves_model(&self) -> bool {
        let requested = self.chat.model.as_str();
        if requested.is_empty() {
            return false;
        }
        self.shared.config.models.iter().any(|model| {
            model == requested || model.contains(requested) || requested.contains(model.as_str())
        })
    }

    fn drop_due(&self) -> bool {
        match self.behavior {
            Behavior::DropAfterChunks(limit) => self.content_chunks_sent >= limit,
            _ => false,
        }
    }

    /// Asks the connection to close without a close frame, and returns why the
    /// response stops here.
    async fn drop_connection(&self) -> Stop {
        tracing::info!(
            content_chunks_sent = self.content_chunks_sent,
            "dropping the connection as configured"
        );
        match self.outbound.send(Outbound::DropConnection).await {
            Ok(()) => Stop::Dropped,
            Err(_) => Stop::ConnectionGone,
        }
    }

    /// Waits until `tokens` tokens are due at the configured rate, counted from
    /// `started`. Fails with [`Stop::Cancelled`] when the request is cancelled.
    async fn pace(&self, started: Instant, tokens: u64) -> Result<(), Stop> {
        let rate = self.shared.config.token_rate;
        if rate.is_nan() || rate <= 0.0 {
            return if self.cancel.is_cancelled() {
                Err(Stop::Cancelled)
            } else {
                Ok(())
            };
        }

        let due = started + Duration::from_secs_f64(tokens as f64 / rate);
        tokio::select! {
            () = self.cancel.cancelled() => Err(Stop::Cancelled),
            () = tokio::time::sleep_until(due) => Ok(()),
        }
    }

    async fn send_chunk(&self, line: &str) -> Result<(), Stop> {
        let chunk = if self.behavior == Behavior::PlaintextChunks {
            InferenceResponseChunk {
                request_id: self.request_id.clone(),
                data: Some(line.to_owned()),
                encrypted_data: None,
            }
        } else {
            InferenceResponseChunk {
                request_id: self.request_id.clone(),
                data: None,
                encrypted_data: Some(self.shared.key_pair.seal(&self.peer, line.as_bytes())),
            }
        };
        self.send(ProviderMessage::InferenceResponseChunk(chunk))
            .await
    }

    async fn send(&self, message: ProviderMessage) -> Result<(), Stop> {
        self.outbound
            .send(Outbound::Message(Box::new(message)))
            .await
            .map_err(|_| Stop::ConnectionGone)
    }
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
