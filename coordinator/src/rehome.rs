//! Re-homing of providers whose home moved to another node after a ring change.
//! This node stops giving such a provider new requests and lets it finish the
//! ones it has. Then it closes the socket with the re-home close code, and the
//! provider reconnects through a router to its new home.
//!
//! Each check reads the member set from the bus once a second. Moves start after
//! a random delay of up to [`MAX_JITTER`] and at most [`MAX_MOVES_PER_SECOND`]
//! sockets close per second, so a membership change never makes a whole fleet
//! reconnect at once. A provider still busy after [`MOVE_DEADLINE`] is moved
//! anyway; its requests then end as a provider failure would.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use switchyard_shared::cluster::{MemberState, home_of};
use switchyard_shared::ids::ProviderId;
use switchyard_shared::ring::Ring;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::node::NodeState;
use crate::provider::ProviderHandle;
use crate::session::close_code;

pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_JITTER: Duration = Duration::from_secs(2);
pub const MAX_MOVES_PER_SECOND: usize = 50;
pub const MOVE_DEADLINE: Duration = Duration::from_secs(120);

struct PendingMove {
    provider: Arc<ProviderHandle>,
    /// When the move may start.
    not_before: Instant,
    /// When the move happens even if the provider is still busy.
    deadline: Instant,
}

/// Runs until the node shuts down.
pub async fn run(state: Arc<NodeState>) {
    let Some(bus) = state.bus.clone() else {
        return;
    };
    let mut ticks = tokio::time::interval(CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending: HashMap<ProviderId, PendingMove> = HashMap::new();
    let mut previous_ring: Option<Ring> = None;

    loop {
        tokio::select! {
            _ = state.shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let members = match bus.members().await {
            Ok(members) => members,
            // Without a view of the ring there is nothing safe to move.
            Err(_) => continue,
        };
        // A running node counts itself even if its own record lapsed for a
        // moment (a stalled heartbeat), so it does not send its providers away.
        // Only draining takes it out.
        let own_id = state.config.node_id.clone();
        let mut active: Vec<_> = members
            .into_iter()
            .filter(|member| member.state == MemberState::Active && member.node_id != own_id)
            .map(|member| member.node_id)
            .collect();
        if !state.is_draining() {
            active.push(own_id);
        }
        let ring = Ring::new(active);
        if ring.is_empty() {
            continue;
        }

        // A ring must hold for two checks in a row before providers move, so a
        // member that flickers moves no provider.
        let stable = previous_ring.as_ref() == Some(&ring);
        previous_ring = Some(ring.clone());
        if stable {
            plan_moves(&state, &ring, &mut pending);
        }
        move_ready(&state, &mut pending);
    }
}

/// Marks the providers whose home is now elsewhere, and unmarks those whose home
/// is this node again.
fn plan_moves(state: &NodeState, ring: &Ring, pending: &mut HashMap<ProviderId, PendingMove>) {
    let draining = state.is_draining();
    for provider in state.providers() {
        let primary = provider
            .models
            .first()
            .and_then(|model| state.catalog.get(model.as_str()))
            .map(|entry| (entry.id.to_string(), entry.replicas as usize));
        let primary = primary
            .as_ref()
            .map(|(model, replicas)| (model.as_str(), *replicas));
        let home = home_of(ring, primary, &provider.public_key_base64);
        let belongs_here = !draining && home == Some(&state.config.node_id);

        if belongs_here {
            if pending.remove(&provider.id).is_some() {
                provider.set_migrating(false);
                state.refresh_provider(&provider);
            }
            continue;
        }
        if pending.contains_key(&provider.id) {
            continue;
        }

        provider.set_migrating(true);
        state.refresh_provider(&provider);
        let jitter = rand::thread_rng().gen_range(Duration::ZERO..=MAX_JITTER);
        let now = Instant::now();
        pending.insert(
            provider.id,
            PendingMove {
                provider: provider.clone(),
                not_before: now + jitter,
                deadline: now + MOVE_DEADLINE,
            },
        );
    }
    // Providers that disconnected on their own need no move.
    pending.retain(|_, planned| !planned.provider.session_token.is_cancelled());
}

/// Closes the sockets of moves whose time has come and whose providers are idle,
/// at most `MAX_MOVES_PER_SECOND` per check.
fn move_ready(state: &NodeState, pending: &mut HashMap<ProviderId, PendingMove>) {
    let now = Instant::now();
    let ready: Vec<ProviderId> = pending
        .iter()
        .filter(|(_, planned)| {
            planned.not_before <= now
                && (planned.provider.in_flight() == 0 || planned.deadline <= now)
        })
        .map(|(id, _)| *id)
        .take(MAX_MOVES_PER_SECOND)
        .collect();

    for id in ready {
        let Some(planned) = pending.remove(&id) else {
            continue;
        };
        if planned.provider.in_flight() > 0 {
            warn!(provider.id = %id, in_flight = planned.provider.in_flight(), "moving a provider that is still busy after the deadline");
        }
        planned.provider.close(close_code::REHOME, "re-home");
        state.metrics.rehomes.increment(&[]);
        info!(provider.id = %id, "provider moved to its new home");
    }
}
