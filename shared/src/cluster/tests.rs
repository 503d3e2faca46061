//! Contract tests of [`ClusterBus`], run against [`InProcessBus`] and against
//! [`RedisBus`] on the server at `SWITCHYARD_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`) under a key prefix of their own, and tests of
//! [`ClusterView`].

use std::sync::Arc;

use super::*;

fn redis_bus() -> Arc<dyn ClusterBus> {
    let url = std::env::var("SWITCHYARD_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("switchyard-test:{}:", uuid::Uuid::new_v4().simple());
    Arc::new(RedisBus::new(&url, &prefix).expect("valid Redis URL"))
}

fn record(node: &str) -> MemberRecord {
    MemberRecord {
        node_id: NodeId::from(node),
        address: format!("http://{node}.test:9000"),
        state: MemberState::Active,
        started_at_ms: 1,
    }
}

fn capacity(model: &str, providers: u32, free_slots: u32) -> ModelCapacity {
    ModelCapacity {
        model: ModelId::from(model),
        providers,
        total_slots: providers * 4,
        free_slots,
        queue_depth: 0,
        decode_tokens_per_second: 50 * providers,
    }
}

fn snapshot(
    node: &str,
    sequence: u64,
    taken_at_ms: i64,
    models: Vec<ModelCapacity>,
) -> CapacitySnapshot {
    CapacitySnapshot {
        node_id: NodeId::from(node),
        sequence,
        taken_at_ms,
        models,
    }
}

macro_rules! bus_contract {
    ($check:ident) => {
        mod $check {
            #[tokio::test]
            async fn in_process() {
                super::$check(std::sync::Arc::new(super::InProcessBus::new())).await;
            }

            #[tokio::test]
            async fn redis() {
                super::$check(super::redis_bus()).await;
            }
        }
    };
}

bus_contract!(members_expire_without_heartbeat);
async fn members_expire_without_heartbeat(bus: Arc<dyn ClusterBus>) {
    bus.heartbeat(&record("a"), Duration::from_millis(200))
        .await
        .unwrap();
    bus.heartbeat(&record("b"), Duration::from_secs(30))
        .await
        .unwrap();
    let mut members = bus.members().await.unwrap();
    members.sort_by(|left, right| left.node_id.cmp(&right.node_id));
    assert_eq!(members, vec![record("a"), record("b")]);

    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        bus.members().await.unwrap(),
        vec![record("b")],
        "a missed its heartbeat"
    );
}

bus_contract!(leave_removes_member_and_snapshot);
async fn leave_removes_member_and_snapshot(bus: Arc<dyn ClusterBus>) {
    bus.heartbeat(&record("a"), Duration::from_secs(30))
        .await
        .unwrap();
    bus.publish_snapshot(
        &snapshot("a", 1, now_ms(), vec![capacity("m", 1, 4)]),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    bus.leave(&NodeId::from("a")).await.unwrap();
    assert!(bus.members().await.unwrap().is_empty());
    assert!(bus.snapshots().await.unwrap().is_empty());
}

bus_contract!(snapshots_replace_and_expire);
async fn snapshots_replace_and_expire(bus: Arc<dyn ClusterBus>) {
    bus.publish_snapshot(
        &snapshot("a", 1, 10, vec![capacity("m", 1, 4)]),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    bus.publish_snapshot(
        &snapshot("a", 2, 20, vec![capacity("m", 1, 3)]),
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    bus.publish_snapshot(
        &snapshot("b", 1, 20, vec![capacity("m", 2, 8)]),
        Duration::from_millis(200),
    )
    .await
    .unwrap();

    let mut snapshots = bus.snapshots().await.unwrap();
    snapshots.sort_by(|left, right| left.node_id.cmp(&right.node_id));
    assert_eq!(snapshots.len(), 2);
    assert_eq!(
        snapshots[0].sequence, 2,
        "a newer snapshot replaces the older one"
    );

    tokio::time::sleep(Duration::from_millis(400)).await;
    let snapshots = bus.snapshots().await.unwrap();
    assert_eq!(snapshots.len(), 1, "b's snapshot expired");
    assert_eq!(snapshots[0].node_id, NodeId::from("a"));
}

#[tokio::test]
async fn unreachable_redis_fails_fast() {
    // Nothing listens on port 1 of loopback.
    let bus = RedisBus::new("redis://127.0.0.1:1", "switchyard-test:").unwrap();
    let started = std::time::Instant::now();
    assert!(bus.members().await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

fn view_of(nodes: &[&str]) -> ClusterView {
    let view = ClusterView::new();
    view.set_members(nodes.iter().map(|node| record(node)).collect());
    view
}

fn ids(records: &[MemberRecord]) -> Vec<&str> {
    records
        .iter()
        .map(|record| record.node_id.as_str())
        .collect()
}

#[test]
fn membership_change_rebuilds_ring() {
    let view = view_of(&["a", "b"]);
    assert_eq!(view.ring().nodes().len(), 2);
    assert!(
        !view.set_members(vec![record("b"), record("a")]),
        "same set, no change"
    );
    assert!(view.set_members(vec![record("a"), record("b"), record("c")]));
    assert_eq!(view.ring().nodes().len(), 3);

    let mut draining = record("c");
    draining.state = MemberState::Draining;
    assert!(view.set_members(vec![record("a"), record("b"), draining]));
    assert_eq!(
        view.ring().nodes().len(),
        2,
        "a draining node leaves the ring"
    );
}

#[test]
fn owner_with_free_slots_comes_first() {
    let view = view_of(&["a", "b", "c"]);
    let owner = view.ring().owner("m").unwrap().clone();
    view.apply_snapshot(snapshot(
        owner.as_str(),
        1,
        now_ms(),
        vec![capacity("m", 1, 2)],
    ));

    let candidates = view.candidates("m", 1, now_ms());
    assert_eq!(candidates[0].node_id, owner);
    assert_eq!(candidates.len(), 3, "every node is a last resort");
}

#[test]
fn node_with_free_slots_beats_busy_owner() {
    let view = view_of(&["a", "b", "c"]);
    let ring = view.ring();
    let ranked: Vec<NodeId> = ring.ranked("m").into_iter().cloned().collect();
    let (owner, other) = (&ranked[0], &ranked[1]);
    view.apply_snapshot(snapshot(
        owner.as_str(),
        1,
        now_ms(),
        vec![capacity("m", 2, 0)],
    ));
    view.apply_snapshot(snapshot(
        other.as_str(),
        1,
        now_ms(),
        vec![capacity("m", 1, 3)],
    ));

    let candidates = view.candidates("m", 1, now_ms());
    assert_eq!(candidates[0].node_id, *other, "free slots elsewhere first");
    assert_eq!(
        candidates[1].node_id, *owner,
        "then the busy owner, which queues"
    );
}

#[test]
fn stale_and_older_snapshots_are_ignored() {
    let view = view_of(&["a", "b"]);
    let ranked: Vec<NodeId> = view.ring().ranked("m").into_iter().cloned().collect();
    let other = &ranked[1];

    // A snapshot older than the freshness limit does not count.
    let stale_at = now_ms() - SNAPSHOT_MAX_AGE.as_millis() as i64 - 1_000;
    view.apply_snapshot(snapshot(
        other.as_str(),
        5,
        stale_at,
        vec![capacity("m", 1, 4)],
    ));
    assert_eq!(
        view.candidates("m", 1, now_ms())[0].node_id,
        ranked[0],
        "the owner leads"
    );

    // A fresh snapshot counts, and an older sequence does not replace it.
    view.apply_snapshot(snapshot(
        other.as_str(),
        6,
        now_ms(),
        vec![capacity("m", 1, 4)],
    ));
    view.apply_snapshot(snapshot(
        other.as_str(),
        4,
        now_ms(),
        vec![capacity("m", 1, 0)],
    ));
    assert_eq!(view.candidates("m", 1, now_ms())[0].node_id, *other);
}

#[test]
fn draining_node_gets_no_requests() {
    let view = view_of(&["a", "b"]);
    let mut draining = record("a");
    draining.state = MemberState::Draining;
    view.set_members(vec![draining, record("b")]);
    view.apply_snapshot(snapshot("a", 1, now_ms(), vec![capacity("m", 5, 20)]));
    assert_eq!(ids(&view.candidates("m", 1, now_ms())), vec!["b"]);
}

#[test]
fn replicas_spread_over_owners() {
    let view = view_of(&["a", "b", "c", "d"]);
    let owners: Vec<NodeId> = view.ring().owners("hot", 2).into_iter().cloned().collect();
    for owner in &owners {
        view.apply_snapshot(snapshot(
            owner.as_str(),
            1,
            now_ms(),
            vec![capacity("hot", 1, 1)],
        ));
    }
    let candidates = view.candidates("hot", 2, now_ms());
    assert_eq!(candidates[0].node_id, owners[0]);
    assert_eq!(candidates[1].node_id, owners[1]);
}

bus_contract!(published_snapshots_are_pushed);
async fn published_snapshots_are_pushed(bus: Arc<dyn ClusterBus>) {
    use futures::StreamExt as _;

    let mut pushed = bus.subscribe_snapshots().await.unwrap();
    let sent = snapshot("a", 7, now_ms(), vec![capacity("m", 1, 2)]);
    bus.publish_snapshot(&sent, Duration::from_secs(30))
        .await
        .unwrap();

    let received = tokio::time::timeout(Duration::from_secs(2), pushed.next())
        .await
        .expect("a snapshot arrives")
        .expect("the subscription is open");
    assert_eq!(received, sent);
}

#[test]
fn large_change_detection() {
    let base = snapshot("a", 1, 0, vec![capacity("m", 2, 4)]);
    let same = snapshot("a", 2, 0, vec![capacity("m", 2, 3)]);
    assert!(!large_change(&base, &same), "one slot of eight is small");

    let half = snapshot("a", 2, 0, vec![capacity("m", 2, 0)]);
    assert!(large_change(&base, &half), "free slots crossed zero");

    let new_provider = snapshot("a", 2, 0, vec![capacity("m", 3, 4)]);
    assert!(large_change(&base, &new_provider));

    let new_model = snapshot("a", 2, 0, vec![capacity("m", 2, 4), capacity("n", 1, 4)]);
    assert!(large_change(&base, &new_model));
}

bus_contract!(routers_count_each_other);
async fn routers_count_each_other(bus: Arc<dyn ClusterBus>) {
    bus.heartbeat_router("router-a", Duration::from_secs(30))
        .await
        .unwrap();
    bus.heartbeat_router("router-b", Duration::from_millis(200))
        .await
        .unwrap();
    bus.heartbeat_router("router-a", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(bus.router_count().await.unwrap(), 2);

    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        bus.router_count().await.unwrap(),
        1,
        "router-b stopped heartbeating"
    );
}
