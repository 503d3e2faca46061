//! The router's mirror of the cluster: it reads the member set and the capacity
//! snapshots from the cluster bus every 500 ms into a [`ClusterView`], and
//! applies snapshots pushed on the bus's channel as they arrive, so choosing a
//! node for a request or a provider reads memory only. While the bus is
//! unreachable the router keeps its last view.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::state::RouterState;

/// Time between reads of the bus.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(500);
/// Expiry of a router's heartbeat; routers count each other for the rate-limit
/// fallback.
pub const ROUTER_TTL: Duration = Duration::from_secs(3);

/// Refreshes the view until the router shuts down.
pub async fn refresh(state: Arc<RouterState>) {
    let Some(bus) = state.bus.clone() else {
        return;
    };
    let mut ticks = tokio::time::interval(REFRESH_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let read = async {
            bus.heartbeat_router(&state.router_id, ROUTER_TTL).await?;
            let routers = bus.router_count().await?;
            let members = bus.members().await?;
            let snapshots = bus.snapshots().await?;
            Ok::<_, switchyard_shared::cluster::BusError>((routers, members, snapshots))
        };
        match read.await {
            Ok((routers, members, snapshots)) => {
                state.limiter.set_router_count(routers);
                if failing {
                    failing = false;
                    info!("cluster bus reachable again");
                }
                let count = members.len();
                if state.view.set_members(members) {
                    info!(members = count, "cluster membership changed");
                }
                for snapshot in snapshots {
                    state.view.apply_snapshot(snapshot);
                }
            }
            Err(error) => {
                state
                    .redis_errors
                    .increment(&[("operation", "cluster_view")]);
                if !failing {
                    failing = true;
                    warn!(error = %error, "cluster bus unreachable; routing on the last known view");
                }
            }
        }
    }
}

/// Applies pushed snapshots until the router shuts down, subscribing again
/// (after a pause) whenever the subscription ends.
pub async fn follow_snapshots(state: Arc<RouterState>) {
    use futures::StreamExt as _;

    let Some(bus) = state.bus.clone() else {
        return;
    };
    loop {
        match bus.subscribe_snapshots().await {
            Ok(mut snapshots) => loop {
                tokio::select! {
                    _ = state.shutdown.cancelled() => return,
                    next = snapshots.next() => match next {
                        Some(snapshot) => state.view.apply_snapshot(snapshot),
                        None => break,
                    },
                }
            },
            Err(_) => state.redis_errors.increment(&[("operation", "subscribe")]),
        }
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
