//! The stateless edge of a Switchyard cluster: serves the consumer API,
//! authenticates API keys, picks a coordinator node for each request and streams
//! its answer back, and pipes provider WebSockets to their home nodes.
//!
//! Layout: `http` is the consumer HTTP surface, `account` the balance and usage
//! endpoints, `admin` the operator endpoints, `auth` API key checks, `proxy`
//! request forwarding, `ws_proxy` the provider socket pipe, `state` the shared
//! state, and `config` the settings.

pub mod account;
pub mod admin;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod http;
pub mod proxy;
pub mod rate_limit;
pub mod revocation;
pub mod state;
pub mod ws_proxy;

use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::info;

pub use config::{NodeAddress, RouterConfig};
pub use state::RouterState;

/// Longest a stopping router waits for answers in flight before it closes the
/// provider pipes under them.
pub const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Serves the router on `listener` until `state.shutdown` is cancelled, then
/// drains: it stops accepting, lets answers in flight finish, and closes
/// provider pipes with code 1001 so providers reconnect through another router.
pub async fn serve(listener: TcpListener, state: Arc<RouterState>) -> std::io::Result<()> {
    let address = listener.local_addr()?;
    info!(%address, nodes = state.config.nodes.len(), "router listening");

    let listener_task = tokio::spawn(revocation::listen(state.clone()));
    let refresh_task = tokio::spawn(cluster::refresh(state.clone()));
    let follow_task = tokio::spawn(cluster::follow_snapshots(state.clone()));
    // On shutdown, provider pipes stay open until the answers in flight finish
    // (at most DRAIN_DEADLINE), so those answers keep their providers.
    let drain = state.clone();
    tokio::spawn(async move {
        drain.shutdown.cancelled().await;
        let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
        while drain.active_streams() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        drain.close_providers.cancel();
    });
    let shutdown = state.shutdown.clone();
    let served = axum::serve(listener, http::app(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    listener_task.abort();
    refresh_task.abort();
    follow_task.abort();
    served?;
    info!("router stopped");
    Ok(())
}
