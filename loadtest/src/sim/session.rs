//! One WebSocket connection of a simulated provider: connect, send `register`, then
//! read coordinator messages, send heartbeats and write the frames of in-flight
//! requests until the connection ends.
//!
//! The connection task is the socket's only reader and writer. Request tasks hand
//! it their frames through a bounded channel, so frames of one request reach the
//! wire in the order they were produced.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt as _, StreamExt as _};
use switchyard_shared::protocol::{CoordinatorMessage, ProviderMessage};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use super::{Shared, frames, request};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Frames queued per connection before request tasks wait for the writer.
const OUTBOUND_CAPACITY: usize = 256;

/// Limit on sending the close frame when the provider shuts down.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Work that a request task hands to the connection.
pub(super) enum Outbound {
    /// Boxed so that every queued item is not as large as a `register`.
    Message(Box<ProviderMessage>),
    /// Close the TCP connection at once, without a WebSocket close frame.
    DropConnection,
}

pub(super) enum SessionEnd {
    Shutdown,
    ConnectFailed(ConnectError),
    Ended(EndReason),
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ConnectError {
    #[error("connect timed out after {} ms", .0.as_millis())]
    TimedOut(Duration),
    #[error("WebSocket handshake failed: {0}")]
    Handshake(tungstenite::Error),
}

/// Reason an established connection ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum EndReason {
    #[error("coordinator sent a close frame (code {code:?})")]
    CloseFrame { code: Option<u16> },
    #[error("connection closed without a close frame")]
    StreamEnded,
    #[error("WebSocket error: {0}")]
    Failed(tungstenite::Error),
    #[error("dropped on purpose by the configured behavior")]
    Dropped,
}

/// Connects once and serves the connection until it ends or `shutdown` fires.
pub(super) async fn run(shared: &Arc<Shared>, shutdown: &CancellationToken) -> SessionEnd {
    let connect = tokio::time::timeout(
        shared.config.connect_timeout,
        tokio_tungstenite::connect_async(shared.config.url.as_str()),
    );
    let socket = tokio::select! {
        () = shutdown.cancelled() => return SessionEnd::Shutdown,
        result = connect => match result {
            Ok(Ok((socket, _response))) => socket,
            Ok(Err(error)) => return SessionEnd::ConnectFailed(ConnectError::Handshake(error)),
            Err(_elapsed) => {
                let limit = shared.config.connect_timeout;
                return SessionEnd::ConnectFailed(ConnectError::TimedOut(limit));
            }
        },
    };
    shared.update_stats(|stats| stats.connections += 1);

    let end = serve(shared, socket, shutdown).await;
    shared.update_stats(|stats| stats.connected = false);
    end
}

async fn serve(
    shared: &Arc<Shared>,
    mut socket: Socket,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let register = ProviderMessage::Register(frames::register(shared));
    if let Err(error) = send(&mut socket, &register).await {
        return SessionEnd::Ended(EndReason::Failed(error));
    }
    shared.update_stats(|stats| {
        stats.registrations += 1;
        stats.connected = true;
    });
    tracing::info!(url = %shared.config.url, "registered with coordinator");

    // Dropping the set when this function returns aborts every in-flight request,
    // as the provider agent does when its connection ends.
    let mut requests = JoinSet::new();
    let (outbound_tx, mut outbound_rx) = mpsc::channel(OUTBOUND_CAPACITY);

    // `interval` panics on a zero period. Its first tick completes at once, so the
    // first heartbeat directly follows `register`.
    let period = shared
        .config
        .heartbeat_interval
        .max(Duration::from_millis(1));
    let mut heartbeat = tokio::time::interval(period);
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                close(&mut socket).await;
                return SessionEnd::Shutdown;
            }

            Some(outbound) = outbound_rx.recv() => match outbound {
                Outbound::Message(message) => {
                    if let Err(error) = send(&mut socket, &message).await {
                        return SessionEnd::Ended(EndReason::Failed(error));
                    }
                }
                Outbound::DropConnection => {
                    shared.update_stats(|stats| stats.connections_dropped += 1);
                    return SessionEnd::Ended(EndReason::Dropped);
                }
            },

            _ = heartbeat.tick() => {
                let message = ProviderMessage::Heartbeat(frames::heartbeat(shared));
                if let Err(error) = send(&mut socket, &message).await {
                    return SessionEnd::Ended(EndReason::Failed(error));
                }
                shared.update_stats(|stats| stats.heartbeats_sent += 1);
            }

            frame = socket.next() => {
                let text = match frame {
                    None => return SessionEnd::Ended(EndReason::StreamEnded),
                    Some(Err(error)) => return SessionEnd::Ended(EndReason::Failed(error)),
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        let code = frame.map(|frame| u16::from(frame.code));
                        shared.update_stats(|stats| stats.last_close_code = code);
                        // Flush the close reply that tungstenite queued.
                        close(&mut socket).await;
                        return SessionEnd::Ended(EndReason::CloseFrame { code });
                    }
                    // tungstenite replies to pings itself, and the provider agent
                    // ignores binary frames.
                    Some(Ok(_)) => continue,
                };

                let reply = handle_text(shared, text.as_str(), &outbound_tx, &mut requests);
                let Some(reply) = reply else {
                    continue;
                };
                if let Err(error) = send(&mut socket, &reply).await {
                    return SessionEnd::Ended(EndReason::Failed(error));
                }
            }

            Some(joined) = requests.join_next() => {
                match joined {
                    Err(error) if error.is_panic() => {
                        tracing::error!(%error, "inference request task panicked");
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Acts on one coordinator message and returns the reply to write at once, if any.
fn handle_text(
    shared: &Arc<Shared>,
    text: &str,
    outbound: &mpsc::Sender<Outbound>,
    requests: &mut JoinSet<()>,
) -> Option<ProviderMessage> {
    let message = match CoordinatorMessage::parse(text) {
        Ok(message) => message,
        Err(error) => {
            // The error text can quote field values, so only its category is logged.
            tracing::debug!(
                error.category = ?error.classify(),
                message_bytes = text.len(),
                "ignored a coordinator message that failed to parse"
            );
            return None;
        }
    };

    match message {
        CoordinatorMessage::AttestationChallenge(challenge) => {
            shared.update_stats(|stats| stats.challenges_answered += 1);
            Some(ProviderMessage::AttestationResponse(
                frames::attestation_response(shared, challenge),
            ))
        }
        CoordinatorMessage::InferenceRequest(inference) => {
            request::start(shared, inference, outbound, requests);
            None
        }
        CoordinatorMessage::Cancel(cancel) => {
            let was_active = request::cancel(shared, &cancel.request_id);
            tracing::debug!(request.id = %cancel.request_id, was_active, "received cancel");
            shared.update_stats(|stats| stats.cancelled_request_ids.push(cancel.request_id));
            None
        }
        CoordinatorMessage::RuntimeStatus(status) => {
            tracing::info!(
                verified = status.verified,
                mismatches = status.mismatches.len(),
                "received runtime status"
            );
            shared.update_stats(|stats| stats.runtime_status_received += 1);
            None
        }
    }
}

async fn send(socket: &mut Socket, message: &ProviderMessage) -> Result<(), tungstenite::Error> {
    socket.send(Message::text(message.to_json())).await
}

/// Sends a normal close frame, or flushes the reply to the coordinator's close
/// frame. Errors are ignored because the connection is ending anyway.
async fn close(socket: &mut Socket) {
    let frame = CloseFrame {
        code: CloseCode::Normal,
        reason: "provider shutting down".into(),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close(Some(frame))).await;
}
