//! The provider WebSocket entry point: reads `register`, picks the provider's home
//! node, and pipes frames both ways.
//!
//! The home node is the ring owner of the provider's primary model (its first
//! model in the catalog). For a model with `replicas = k`, one of its k owners is
//! chosen by a hash of the provider's public key, so a hot model's providers
//! spread over k nodes and a reconnecting provider lands on the same one.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{self, CloseFrame, Message, WebSocket};
use futures::{SinkExt, StreamExt};
use switchyard_shared::cluster::home_of;
use switchyard_shared::internal;
use switchyard_shared::protocol::{MAX_MESSAGE_BYTES, ProviderMessage, Register};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::NodeAddress;
use crate::state::RouterState;

/// Time a new provider connection has to send `register`.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Close codes the router sends to providers.
mod close_code {
    pub const POLICY: u16 = 1008;
    /// The home node could not be reached or went away; reconnect.
    pub const TRY_AGAIN_LATER: u16 = 1013;
    /// The router is shutting down; reconnect through another router.
    pub const GOING_AWAY: u16 = 1001;
}

/// Runs one provider connection to its end.
pub async fn pipe_provider(state: Arc<RouterState>, mut socket: WebSocket) {
    let register_text = match tokio::time::timeout(REGISTER_TIMEOUT, first_text(&mut socket)).await
    {
        Ok(Some(text)) => text,
        Ok(None) => return,
        Err(_) => {
            close(&mut socket, close_code::POLICY, "register timed out").await;
            return;
        }
    };
    let register = match ProviderMessage::parse(&register_text) {
        Ok(ProviderMessage::Register(register)) => register,
        _ => {
            close(
                &mut socket,
                close_code::POLICY,
                "first message must be register",
            )
            .await;
            return;
        }
    };

    let Some(home) = home_node(&state, &register) else {
        close(
            &mut socket,
            close_code::TRY_AGAIN_LATER,
            "no coordinator node available",
        )
        .await;
        return;
    };
    let span = info_span!("provider_pipe", node.id = %home.id);
    async move {
        let upstream = match connect_node(&state, &home).await {
            Ok(upstream) => upstream,
            Err(error) => {
                warn!(error = %error, "failed to connect a provider to its home node");
                close(
                    &mut socket,
                    close_code::TRY_AGAIN_LATER,
                    "home node unreachable",
                )
                .await;
                return;
            }
        };
        info!("provider connected to its home node");
        pipe(state, socket, upstream, register_text).await;
        debug!("provider pipe closed");
    }
    .instrument(span)
    .await;
}

async fn first_text(socket: &mut WebSocket) -> Option<String> {
    loop {
        match socket.recv().await? {
            Ok(Message::Text(text)) => return Some(text.to_string()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Binary(_)) => {
                close(
                    socket,
                    close_code::POLICY,
                    "first message must be a text register",
                )
                .await;
                return None;
            }
            Ok(Message::Close(_)) | Err(_) => return None,
        }
    }
}

/// Picks the provider's home node from its primary model.
fn home_node(state: &RouterState, register: &Register) -> Option<NodeAddress> {
    let identity = register.public_key.as_deref().unwrap_or_default();
    let primary = register
        .models
        .iter()
        .find_map(|model| state.catalog.get(&model.id));

    let ring = state.placement_ring();
    // A provider with no catalog model still gets a session (to heartbeat and be
    // told what is wrong), placed by its key.
    let primary = primary
        .as_ref()
        .map(|entry| (entry.id.as_str(), entry.replicas as usize));
    let home = home_of(&ring, primary, identity)?;
    state.node_address(home)
}

type Upstream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect_node(
    state: &RouterState,
    node: &NodeAddress,
) -> Result<Upstream, tungstenite::Error> {
    let url = format!("{}{}", node.ws_base_url(), internal::PROVIDER_SESSION_PATH);
    let mut request = url.into_client_request()?;
    let token = state.config.cluster_token.parse().map_err(|_| {
        tungstenite::Error::Url(tungstenite::error::UrlError::UnableToConnect(
            "cluster token is not a valid header value".into(),
        ))
    })?;
    request.headers_mut().insert(internal::CLUSTER_TOKEN, token);

    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let (upstream, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async_with_config(request, Some(config), true),
    )
    .await
    .map_err(|_| {
        tungstenite::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        ))
    })??;
    Ok(upstream)
}

/// Forwards `register` and then frames both ways until either side closes; the
/// other side is closed with the same code.
async fn pipe(
    state: Arc<RouterState>,
    provider: WebSocket,
    mut node: Upstream,
    register_text: String,
) {
    if node
        .send(tungstenite::Message::text(register_text))
        .await
        .is_err()
    {
        let (mut provider_sink, _) = provider.split();
        let _ = provider_sink
            .send(close_message(
                close_code::TRY_AGAIN_LATER,
                "home node went away",
            ))
            .await;
        return;
    }

    let (mut provider_sink, mut provider_stream) = provider.split();
    let (mut node_sink, mut node_stream) = node.split();

    loop {
        tokio::select! {
            _ = state.close_providers.cancelled() => {
                let _ = provider_sink.send(close_message(close_code::GOING_AWAY, "router shutting down")).await;
                let _ = node_sink.send(tungstenite::Message::Close(None)).await;
                return;
            }
            frame = provider_stream.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    if node_sink.send(tungstenite::Message::text(text.as_str())).await.is_err() {
                        let _ = provider_sink.send(close_message(close_code::TRY_AGAIN_LATER, "home node went away")).await;
                        return;
                    }
                }
                Some(Ok(Message::Binary(bytes))) => {
                    if node_sink.send(tungstenite::Message::binary(bytes)).await.is_err() {
                        let _ = provider_sink.send(close_message(close_code::TRY_AGAIN_LATER, "home node went away")).await;
                        return;
                    }
                }
                // The router answers provider pings itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    let upstream_close = frame.map(|frame| tungstenite::protocol::CloseFrame {
                        code: frame.code.into(),
                        reason: frame.reason.as_str().into(),
                    });
                    let _ = node_sink.send(tungstenite::Message::Close(upstream_close)).await;
                    return;
                }
                Some(Err(_)) | None => {
                    let _ = node_sink.send(tungstenite::Message::Close(None)).await;
                    return;
                }
            },
            frame = node_stream.next() => match frame {
                Some(Ok(tungstenite::Message::Text(text))) => {
                    if provider_sink.send(Message::Text(text.as_str().into())).await.is_err() {
                        let _ = node_sink.send(tungstenite::Message::Close(None)).await;
                        return;
                    }
                }
                Some(Ok(tungstenite::Message::Binary(bytes))) => {
                    if provider_sink.send(Message::Binary(bytes)).await.is_err() {
                        let _ = node_sink.send(tungstenite::Message::Close(None)).await;
                        return;
                    }
                }
                Some(Ok(tungstenite::Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|frame| (u16::from(frame.code), frame.reason.to_string()))
                        .unwrap_or((1000, String::new()));
                    let _ = provider_sink
                        .send(Message::Close(Some(CloseFrame { code, reason: reason.into() })))
                        .await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    let _ = provider_sink.send(close_message(close_code::TRY_AGAIN_LATER, "home node went away")).await;
                    return;
                }
            },
        }
    }
}

fn close_message(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: ws::Utf8Bytes::from_static(reason),
    }))
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let _ = socket.send(close_message(code, reason)).await;
}
