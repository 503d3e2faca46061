//! A node's part in the cluster bus: it heartbeats its member record every
//! second and publishes a capacity snapshot of all its models every 500 ms, and
//! at once when capacity changes a lot, until shutdown, when it leaves the
//! member set.

use std::sync::Arc;
use std::time::Duration;

use switchyard_shared::cluster::{
    CapacitySnapshot, MemberRecord, MemberState, ModelCapacity, large_change, now_ms,
};
use tracing::{info, warn};

use crate::node::NodeState;

/// Time between heartbeats of the member record.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// Expiry of a member record: a node silent this long is dead.
pub const MEMBER_TTL: Duration = Duration::from_secs(3);
/// Time between capacity snapshots.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(500);
/// Expiry of a snapshot in the bus.
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(3);
/// Time between checks for a change large enough to publish a snapshot at once.
pub const CHANGE_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Runs until the node shuts down. `address` is the base URL routers use.
pub async fn run(state: Arc<NodeState>, address: String) {
    let Some(bus) = state.bus.clone() else {
        return;
    };
    let record = MemberRecord {
        node_id: state.config.node_id.clone(),
        address,
        state: MemberState::Active,
        started_at_ms: now_ms(),
    };
    let mut heartbeats = tokio::time::interval(HEARTBEAT_INTERVAL);
    let mut snapshots = tokio::time::interval(SNAPSHOT_INTERVAL);
    let mut change_checks = tokio::time::interval(CHANGE_CHECK_INTERVAL);
    let mut sequence = 0u64;
    let mut last_published: Option<CapacitySnapshot> = None;
    let mut failing = false;
    info!(node.id = %record.node_id, address = %record.address, "joining the cluster");

    loop {
        let result = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = heartbeats.tick() => {
                let mut current = record.clone();
                if state.is_draining() {
                    current.state = MemberState::Draining;
                }
                bus.heartbeat(&current, MEMBER_TTL).await
            }
            _ = snapshots.tick() => {
                sequence += 1;
                let current = snapshot(&state, sequence);
                let published = bus.publish_snapshot(&current, SNAPSHOT_TTL).await;
                last_published = Some(current);
                published
            }
            _ = change_checks.tick() => {
                let current = snapshot(&state, sequence + 1);
                match &last_published {
                    Some(previous) if large_change(previous, &current) => {
                        sequence += 1;
                        let published = bus.publish_snapshot(&current, SNAPSHOT_TTL).await;
                        last_published = Some(current);
                        published
                    }
                    _ => Ok(()),
                }
            }
        };
        if result.is_err() {
            state.metrics.redis_errors.increment(&[]);
        }
        match result {
            Ok(()) if failing => {
                failing = false;
                info!("cluster bus reachable again");
            }
            Ok(()) => {}
            Err(error) if !failing => {
                failing = true;
                warn!(error = %error, "cluster bus unreachable; routers keep their last view of this node");
            }
            Err(_) => {}
        }
    }

    // Leaving at once spares routers the wait for the record to expire.
    if let Err(error) = bus.leave(&record.node_id).await {
        warn!(error = %error, "failed to leave the cluster; the member record will expire");
    }
    info!(node.id = %record.node_id, "left the cluster");
}

/// Takes a snapshot of every model this node serves.
pub fn snapshot(state: &NodeState, sequence: u64) -> CapacitySnapshot {
    let saturate = |value: usize| u32::try_from(value).unwrap_or(u32::MAX);
    CapacitySnapshot {
        node_id: state.config.node_id.clone(),
        sequence,
        taken_at_ms: now_ms(),
        models: state
            .scheduler
            .model_capacity()
            .into_iter()
            .map(|capacity| ModelCapacity {
                model: capacity.model,
                providers: saturate(capacity.providers),
                total_slots: saturate(capacity.total_slots),
                free_slots: saturate(capacity.free_slots),
                queue_depth: saturate(capacity.queue_depth),
                decode_tokens_per_second: capacity.decode_tokens_per_second.min(f64::from(u32::MAX))
                    as u32,
            })
            .collect(),
    }
}
