//! The router's mirror of the cluster: it reads the member set and the capacity
//! snapshots from the cluster bus every 500 ms into a [`ClusterView`], so
//! choosing a node for a request or a provider reads memory only. While the bus
//! is unreachable the router keeps its last view.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use crate::state::RouterState;

/// Time between reads of the bus.
pub const REFRESH_INTERVAL: Duration = Duration::from_millis(500);

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
            let members = bus.members().await?;
            let snapshots = bus.snapshots().await?;
            Ok::<_, switchyard_shared::cluster::BusError>((members, snapshots))
        };
        match read.await {
            Ok((members, snapshots)) => {
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
            Err(error) if !failing => {
                failing = true;
                warn!(error = %error, "cluster bus unreachable; routing on the last known view");
            }
            Err(_) => {}
        }
    }
}
