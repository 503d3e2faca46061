//! Cluster state shared through a bus: which nodes are alive (membership) and
//! how much capacity each has per model (snapshots).
//!
//! Each node heartbeats its [`MemberRecord`] with a short expiry and publishes a
//! [`CapacitySnapshot`] of all its models. Routers read both into a
//! [`ClusterView`] in the background, so choosing a node for a request reads
//! memory only. [`RedisBus`] is the shared implementation; [`InProcessBus`]
//! serves `switchyard dev` and tests in one process. Both pass one contract
//! test suite.
//!
//! Redis keys (under the cluster's prefix): `member:<node id>` and
//! `snapshot:<node id>`, both JSON with an expiry.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redis::AsyncCommands as _;
use serde::{Deserialize, Serialize};

use crate::ids::{ModelId, NodeId};
use crate::ring::Ring;

/// Whether a node takes new work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    Active,
    /// Still alive and finishing its work, but taking none.
    Draining,
}

/// A node's entry in the member set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub node_id: NodeId,
    /// Base URL of the node's internal endpoint.
    pub address: String,
    pub state: MemberState,
    /// Unix milliseconds when the node started.
    pub started_at_ms: i64,
}

/// Capacity of one model on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCapacity {
    pub model: ModelId,
    pub providers: u32,
    pub total_slots: u32,
    pub free_slots: u32,
    pub queue_depth: u32,
    /// Sum of the providers' decode speed estimates, tokens per second.
    pub decode_tokens_per_second: u32,
}

/// One node's capacity for every model it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacitySnapshot {
    pub node_id: NodeId,
    /// Grows with each snapshot of the node; an older one is ignored.
    pub sequence: u64,
    /// Unix milliseconds when the snapshot was taken.
    pub taken_at_ms: i64,
    pub models: Vec<ModelCapacity>,
}

/// Returns the current Unix time in milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX)
        })
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cluster bus unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("cluster bus call timed out")]
    TimedOut,
}

/// The shared store of membership and snapshots.
#[async_trait]
pub trait ClusterBus: Send + Sync + 'static {
    /// Writes a member record that expires after `ttl` unless written again.
    async fn heartbeat(&self, record: &MemberRecord, ttl: Duration) -> Result<(), BusError>;

    /// Removes a member at once, as a node does when it leaves.
    async fn leave(&self, node_id: &NodeId) -> Result<(), BusError>;

    /// Returns the members whose records have not expired.
    async fn members(&self) -> Result<Vec<MemberRecord>, BusError>;

    /// Writes a node's snapshot, expiring after `ttl`.
    async fn publish_snapshot(
        &self,
        snapshot: &CapacitySnapshot,
        ttl: Duration,
    ) -> Result<(), BusError>;

    /// Returns the snapshots that have not expired.
    async fn snapshots(&self) -> Result<Vec<CapacitySnapshot>, BusError>;

    /// Marks a router alive for `ttl`; routers count each other this way.
    async fn heartbeat_router(&self, router_id: &str, ttl: Duration) -> Result<(), BusError>;

    /// Counts the routers whose heartbeat has not expired.
    async fn router_count(&self) -> Result<usize, BusError>;

    /// Streams snapshots as nodes publish them, until the connection drops.
    async fn subscribe_snapshots(
        &self,
    ) -> Result<futures::stream::BoxStream<'static, CapacitySnapshot>, BusError>;
}

/// Tells whether `current` differs enough from the last published snapshot to
/// publish it at once: a model appeared or disappeared, its providers changed,
/// its free slots crossed zero, or they moved by at least half its slots.
pub fn large_change(previous: &CapacitySnapshot, current: &CapacitySnapshot) -> bool {
    if previous.models.len() != current.models.len() {
        return true;
    }
    current.models.iter().any(|now| {
        let Some(before) = previous
            .models
            .iter()
            .find(|model| model.model == now.model)
        else {
            return true;
        };
        let crossed_zero = (before.free_slots == 0) != (now.free_slots == 0);
        let moved =
            before.free_slots.abs_diff(now.free_slots).saturating_mul(2) >= now.total_slots.max(1);
        before.providers != now.providers || crossed_zero || moved
    })
}

/// A bus inside one process, with the same expiry rules as Redis.
pub struct InProcessBus {
    routers: Mutex<HashMap<String, std::time::Instant>>,
    members: Mutex<HashMap<NodeId, (MemberRecord, std::time::Instant)>>,
    snapshots: Mutex<HashMap<NodeId, (CapacitySnapshot, std::time::Instant)>>,
    published: tokio::sync::broadcast::Sender<CapacitySnapshot>,
}

impl Default for InProcessBus {
    fn default() -> Self {
        Self {
            routers: Mutex::default(),
            members: Mutex::default(),
            snapshots: Mutex::default(),
            published: tokio::sync::broadcast::channel(1024).0,
        }
    }
}

impl InProcessBus {
    pub fn new() -> Self {
        Self::default()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Single inserts, removes and reads: a poisoned map is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[async_trait]
impl ClusterBus for InProcessBus {
    async fn heartbeat_router(&self, router_id: &str, ttl: Duration) -> Result<(), BusError> {
        lock(&self.routers).insert(router_id.to_owned(), std::time::Instant::now() + ttl);
        Ok(())
    }

    async fn router_count(&self) -> Result<usize, BusError> {
        let now = std::time::Instant::now();
        let mut routers = lock(&self.routers);
        routers.retain(|_, expires| *expires > now);
        Ok(routers.len())
    }

    async fn heartbeat(&self, record: &MemberRecord, ttl: Duration) -> Result<(), BusError> {
        lock(&self.members).insert(
            record.node_id.clone(),
            (record.clone(), std::time::Instant::now() + ttl),
        );
        Ok(())
    }

    async fn leave(&self, node_id: &NodeId) -> Result<(), BusError> {
        lock(&self.members).remove(node_id);
        lock(&self.snapshots).remove(node_id);
        Ok(())
    }

    async fn members(&self) -> Result<Vec<MemberRecord>, BusError> {
        let now = std::time::Instant::now();
        let mut members = lock(&self.members);
        members.retain(|_, (_, expires)| *expires > now);
        Ok(members.values().map(|(record, _)| record.clone()).collect())
    }

    async fn publish_snapshot(
        &self,
        snapshot: &CapacitySnapshot,
        ttl: Duration,
    ) -> Result<(), BusError> {
        lock(&self.snapshots).insert(
            snapshot.node_id.clone(),
            (snapshot.clone(), std::time::Instant::now() + ttl),
        );
        // No subscriber is fine: the stored snapshot is the record.
        let _ = self.published.send(snapshot.clone());
        Ok(())
    }

    async fn snapshots(&self) -> Result<Vec<CapacitySnapshot>, BusError> {
        let now = std::time::Instant::now();
        let mut snapshots = lock(&self.snapshots);
        snapshots.retain(|_, (_, expires)| *expires > now);
        Ok(snapshots
            .values()
            .map(|(snapshot, _)| snapshot.clone())
            .collect())
    }

    async fn subscribe_snapshots(
        &self,
    ) -> Result<futures::stream::BoxStream<'static, CapacitySnapshot>, BusError> {
        use futures::StreamExt as _;

        let receiver = self.published.subscribe();
        let stream = futures::stream::unfold(receiver, |mut receiver| async move {
            loop {
                match receiver.recv().await {
                    Ok(snapshot) => return Some((snapshot, receiver)),
                    // A slow reader misses some; the next poll catches up.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(stream.boxed())
    }
}

/// The bus in Redis. Every call is bounded by a short timeout, so a Redis outage
/// slows nothing down: callers keep their last view. Snapshots are also
/// published on the channel `<prefix>snapshots`.
pub struct RedisBus {
    pool: deadpool_redis::Pool,
    url: String,
    key_prefix: String,
    timeout: Duration,
}

impl RedisBus {
    pub fn new(url: &str, key_prefix: &str) -> Result<Self, BusError> {
        let pool = deadpool_redis::Config::from_url(url)
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .map_err(|error| BusError::Unavailable(Box::new(error)))?;
        Ok(Self {
            pool,
            url: url.to_owned(),
            key_prefix: key_prefix.to_owned(),
            timeout: Duration::from_millis(500),
        })
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, BusError> {
        self.pool
            .get()
            .await
            .map_err(|error| BusError::Unavailable(Box::new(error)))
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, BusError>>,
    ) -> Result<T, BusError> {
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| BusError::TimedOut)?
    }

    async fn write(&self, key: String, value: String, ttl: Duration) -> Result<(), BusError> {
        self.bounded(async {
            let mut connection = self.connection().await?;
            let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            connection
                .pset_ex::<_, _, ()>(key, value, millis)
                .await
                .map_err(|error| BusError::Unavailable(Box::new(error)))
        })
        .await
    }

    /// Reads every key matching `pattern` with SCAN and MGET.
    async fn read_all(&self, pattern: String) -> Result<Vec<String>, BusError> {
        self.bounded(async {
            let mut connection = self.connection().await?;
            let mut keys: Vec<String> = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(500)
                    .query_async(&mut connection)
                    .await
                    .map_err(|error| BusError::Unavailable(Box::new(error)))?;
                keys.extend(batch);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let values: Vec<Option<String>> = redis::cmd("MGET")
                .arg(&keys)
                .query_async(&mut connection)
                .await
                .map_err(|error| BusError::Unavailable(Box::new(error)))?;
            Ok(values.into_iter().flatten().collect())
        })
        .await
    }
}

#[async_trait]
impl ClusterBus for RedisBus {
    async fn heartbeat_router(&self, router_id: &str, ttl: Duration) -> Result<(), BusError> {
        self.write(
            format!("{}router:{router_id}", self.key_prefix),
            "1".to_owned(),
            ttl,
        )
        .await
    }

    async fn router_count(&self) -> Result<usize, BusError> {
        Ok(self
            .read_all(format!("{}router:*", self.key_prefix))
            .await?
            .len())
    }

    async fn heartbeat(&self, record: &MemberRecord, ttl: Duration) -> Result<(), BusError> {
        let value = serde_json::to_string(record)
            .map_err(|error| BusError::Unavailable(Box::new(error)))?;
        self.write(
            format!("{}member:{}", self.key_prefix, record.node_id),
            value,
            ttl,
        )
        .await
    }

    async fn leave(&self, node_id: &NodeId) -> Result<(), BusError> {
        self.bounded(async {
            let mut connection = self.connection().await?;
            connection
                .del::<_, ()>(&[
                    format!("{}member:{node_id}", self.key_prefix),
                    format!("{}snapshot:{node_id}", self.key_prefix),
                ])
                .await
                .map_err(|error| BusError::Unavailable(Box::new(error)))
        })
        .await
    }

    async fn members(&self) -> Result<Vec<MemberRecord>, BusError> {
        let values = self
            .read_all(format!("{}member:*", self.key_prefix))
            .await?;
        Ok(values
            .iter()
            .filter_map(|value| serde_json::from_str(value).ok())
            .collect())
    }

    async fn publish_snapshot(
        &self,
        snapshot: &CapacitySnapshot,
        ttl: Duration,
    ) -> Result<(), BusError> {
        let value = serde_json::to_string(snapshot)
            .map_err(|error| BusError::Unavailable(Box::new(error)))?;
        let key = format!("{}snapshot:{}", self.key_prefix, snapshot.node_id);
        let channel = format!("{}snapshots", self.key_prefix);
        self.bounded(async {
            let mut connection = self.connection().await?;
            let millis = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
            redis::pipe()
                .pset_ex(&key, &value, millis)
                .ignore()
                .publish(&channel, &value)
                .ignore()
                .query_async::<()>(&mut connection)
                .await
                .map_err(|error| BusError::Unavailable(Box::new(error)))
        })
        .await
    }

    async fn snapshots(&self) -> Result<Vec<CapacitySnapshot>, BusError> {
        let values = self
            .read_all(format!("{}snapshot:*", self.key_prefix))
            .await?;
        Ok(values
            .iter()
            .filter_map(|value| serde_json::from_str(value).ok())
            .collect())
    }

    async fn subscribe_snapshots(
        &self,
    ) -> Result<futures::stream::BoxStream<'static, CapacitySnapshot>, BusError> {
        use futures::StreamExt as _;

        let subscribe = async {
            let client = redis::Client::open(self.url.as_str())
                .map_err(|error| BusError::Unavailable(Box::new(error)))?;
            let mut pubsub = client
                .get_async_pubsub()
                .await
                .map_err(|error| BusError::Unavailable(Box::new(error)))?;
            pubsub
                .subscribe(format!("{}snapshots", self.key_prefix))
                .await
                .map_err(|error| BusError::Unavailable(Box::new(error)))?;
            Ok::<_, BusError>(pubsub)
        };
        let pubsub = self.bounded(subscribe).await?;
        let stream = pubsub.into_on_message().filter_map(|message| async move {
            let payload: String = message.get_payload().ok()?;
            serde_json::from_str(&payload).ok()
        });
        Ok(stream.boxed())
    }
}

/// Returns the home node of a provider: for a primary model with `replicas`
/// owners, the owner picked by a hash of the provider's public key, so a hot
/// model's providers spread over its owners and a reconnecting provider lands
/// on the same one; without a catalog model, the ring owner of the key itself.
pub fn home_of<'a>(
    ring: &'a Ring,
    primary: Option<(&str, usize)>,
    public_key: &str,
) -> Option<&'a NodeId> {
    use sha2::{Digest, Sha256};

    match primary {
        Some((model, replicas)) => {
            let owners = ring.owners(model, replicas);
            let digest = Sha256::digest(public_key.as_bytes());
            let pick = usize::from(digest[0]) % owners.len().max(1);
            owners.get(pick).copied()
        }
        None => ring.owner(public_key),
    }
}

/// A router's view of the cluster: live members, the ring over the active ones,
/// and the latest snapshot of each node. Reading it takes a read lock only.
#[derive(Default)]
pub struct ClusterView {
    state: RwLock<ViewState>,
}

#[derive(Default, Clone)]
struct ViewState {
    members: BTreeMap<NodeId, MemberRecord>,
    ring: Ring,
    snapshots: HashMap<NodeId, CapacitySnapshot>,
}

/// Snapshots older than this are ignored: their node stopped publishing.
pub const SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(3);

impl ClusterView {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, ViewState> {
        self.state
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, ViewState> {
        self.state
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces the member set; the ring is rebuilt from the active members.
    /// Returns true when the set of active members changed.
    pub fn set_members(&self, members: Vec<MemberRecord>) -> bool {
        let members: BTreeMap<NodeId, MemberRecord> = members
            .into_iter()
            .map(|record| (record.node_id.clone(), record))
            .collect();
        let ring = Ring::new(
            members
                .values()
                .filter(|record| record.state == MemberState::Active)
                .map(|record| record.node_id.clone()),
        );
        let mut guard = self.write();
        let state = &mut *guard;
        let changed = state.ring != ring;
        state.snapshots.retain(|node, _| members.contains_key(node));
        state.members = members;
        state.ring = ring;
        changed
    }

    /// Keeps `snapshot` unless a newer one of the same node is already held.
    pub fn apply_snapshot(&self, snapshot: CapacitySnapshot) {
        let mut state = self.write();
        let newer_held = state.snapshots.get(&snapshot.node_id).is_some_and(|held| {
            held.sequence >= snapshot.sequence && held.taken_at_ms >= snapshot.taken_at_ms
        });
        if !newer_held {
            state.snapshots.insert(snapshot.node_id.clone(), snapshot);
        }
    }

    pub fn ring(&self) -> Ring {
        self.read().ring.clone()
    }

    pub fn member(&self, node: &NodeId) -> Option<MemberRecord> {
        self.read().members.get(node).cloned()
    }

    pub fn members(&self) -> Vec<MemberRecord> {
        self.read().members.values().cloned().collect()
    }

    /// Orders the nodes to try for `model` at `now_ms`: first the model's ring
    /// owners with free slots, then other active nodes whose fresh snapshot shows
    /// free slots (most first), then nodes with providers but no free slot (they
    /// queue), then the remaining owners, and last every other node in the
    /// model's ring order. Draining nodes are left out.
    pub fn candidates(&self, model: &str, replicas: usize, now_ms: i64) -> Vec<MemberRecord> {
        let state = self.read();
        let owners: Vec<&NodeId> = state.ring.owners(model, replicas);
        let fresh = |node: &NodeId| {
            state
                .snapshots
                .get(node)
                .filter(|snapshot| {
                    now_ms - snapshot.taken_at_ms <= SNAPSHOT_MAX_AGE.as_millis() as i64
                })
                .and_then(|snapshot| {
                    snapshot
                        .models
                        .iter()
                        .find(|capacity| capacity.model.as_str() == model)
                })
        };

        let mut ordered: Vec<NodeId> = Vec::new();
        let push = |node: &NodeId, ordered: &mut Vec<NodeId>| {
            if !ordered.contains(node) {
                ordered.push(node.clone());
            }
        };

        for owner in &owners {
            if fresh(owner).is_some_and(|capacity| capacity.free_slots > 0) {
                push(owner, &mut ordered);
            }
        }
        let mut others: Vec<(&NodeId, u32, u32)> = state
            .ring
            .nodes()
            .iter()
            .filter_map(|node| {
                fresh(node).map(|capacity| (node, capacity.free_slots, capacity.providers))
            })
            .filter(|(_, _, providers)| *providers > 0)
            .collect();
        others.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        for (node, free, _) in &others {
            if *free > 0 {
                push(node, &mut ordered);
            }
        }
        for (node, _, _) in &others {
            push(node, &mut ordered);
        }
        for owner in owners {
            push(owner, &mut ordered);
        }
        // Last resort, for snapshots not yet seen or stale: every other node, in
        // the model's ring order. A node without providers says so before any
        // byte, and the router moves on.
        for node in state.ring.ranked(model) {
            push(node, &mut ordered);
        }

        ordered
            .into_iter()
            .filter_map(|node| state.members.get(&node).cloned())
            .filter(|record| record.state == MemberState::Active)
            .collect()
    }
}

#[cfg(test)]
mod tests;
