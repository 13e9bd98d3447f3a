use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::router::workers::pool::healthy_pool;
use crate::router::workers::room::QueueThreshold;
use crate::router::workers::Role;

fn tenants(yaml: &str) -> Arc<Tenants> {
    let dir = std::env::temp_dir().join(format!("disagg-admission-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tenants.yaml");
    std::fs::write(&path, yaml).unwrap();
    Arc::new(Tenants::load(path, 1).unwrap())
}

fn ticket(t: &Tenants, key: &str, priority: i32) -> Ticket {
    let mut h = axum::http::HeaderMap::new();
    h.insert("authorization", format!("Bearer {key}").parse().unwrap());
    Ticket { tenant: t.of(&h), priority, cost: 100, generations: 1 }
}

#[tokio::test]
async fn permits_queue_in_order_then_refuse() {
    let t = Arc::new(Tenants::none());
    let a = Arc::new(Admission::new(1, 1, Duration::from_millis(200), t.clone(), None));
    let first = a.admit(ticket(&t, "", 0)).await.ok().unwrap();
    assert_eq!(a.in_use(), 1);
    let waiter = {
        let (a, t) = (a.clone(), t.clone());
        tokio::spawn(async move { a.admit(ticket(&t, "", 0)).await.is_ok() })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(a.queued(), 1);
    assert!(matches!(a.admit(ticket(&t, "", 0)).await, Err(Refused::QueueFull(_))), "queue of one is full");
    drop(first);
    assert!(waiter.await.unwrap(), "the waiter got the freed permit");
    assert_eq!(a.in_use(), 0);
    assert_eq!(a.queued(), 0);
    let _hold = a.admit(ticket(&t, "", 0)).await.ok().unwrap();
    assert!(matches!(a.admit(ticket(&t, "", 0)).await, Err(Refused::QueueTimeout(_))));
    assert_eq!(a.queued(), 0);
}

/// Waiters in the order they were admitted: a permit freed one at a time.
async fn order_of(a: &Arc<Admission>, t: &Arc<Tenants>, hold: Permit, asks: &[(&'static str, &'static str, i32)]) -> Vec<&'static str> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (label, key, priority) in asks.iter().copied() {
        let (a, t, tx) = (a.clone(), t.clone(), tx.clone());
        tokio::spawn(async move {
            let permit = a.admit(ticket(&t, key, priority)).await.ok().unwrap();
            tx.send((label, permit)).unwrap();
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(hold);
    let mut order = Vec::new();
    for _ in asks {
        let (label, permit) = rx.recv().await.unwrap();
        order.push(label);
        drop(permit);
    }
    order
}

#[tokio::test]
async fn priority_bands_go_first_and_a_tenant_at_its_concurrency_lets_others_by() {
    let t = tenants(
        "tenants:\n  - name: batch\n    keys: [sk-b]\n    priority: 10\n  - name: chat\n    keys: [sk-c]\n    priority: 0\n    \
         limits: {concurrent: 1}\n",
    );
    let a = Arc::new(Admission::new(1, 100, Duration::from_secs(5), t.clone(), None));
    let hold = a.admit(ticket(&t, "sk-b", 10)).await.ok().unwrap();
    let order = order_of(&a, &t, hold, &[("b1", "sk-b", 10), ("b2", "sk-b", 10), ("c1", "sk-c", 0), ("c2", "sk-c", 0)]).await;
    assert_eq!(order, ["c1", "c2", "b1", "b2"]);

    // chat at its concurrency limit of 1: its second waits, batch goes meanwhile.
    let a = Arc::new(Admission::new(2, 100, Duration::from_secs(5), t.clone(), None));
    let chat = a.admit(ticket(&t, "sk-c", 0)).await.ok().unwrap();
    let waiting_chat = {
        let (a, t) = (a.clone(), t.clone());
        tokio::spawn(async move { a.admit(ticket(&t, "sk-c", 0)).await.is_ok() })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(a.queued(), 1);
    let batch = tokio::time::timeout(Duration::from_secs(1), a.admit(ticket(&t, "sk-b", 10))).await;
    assert!(batch.is_ok_and(|p| p.is_ok()), "a lower band goes while the higher one's tenant is at its limit");
    drop(chat);
    assert!(waiting_chat.await.unwrap());
}

#[tokio::test]
async fn a_tenants_queue_is_bounded_while_anothers_is_served() {
    let t = tenants("tenants:\n  - name: a\n    keys: [sk-a]\n    limits: {max_queued: 2}\n  - name: b\n    keys: [sk-b]\n");
    let a = Arc::new(Admission::new(1, 100, Duration::from_secs(5), t.clone(), None));
    let hold = a.admit(ticket(&t, "sk-a", 0)).await.ok().unwrap();
    let mut waiting = Vec::new();
    for key in ["sk-a", "sk-a", "sk-b"] {
        let (a, t) = (a.clone(), t.clone());
        waiting.push(tokio::spawn(async move { a.admit(ticket(&t, key, 0)).await.is_ok() }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match a.admit(ticket(&t, "sk-a", 0)).await {
        Err(Refused::QueueFull(e)) => assert!(e.message.contains("tenant a") && e.retry_after_secs.is_some(), "{}", e.message),
        _ => panic!("a's third waiter is refused"),
    }
    drop(hold);
    for w in waiting {
        assert!(w.await.unwrap(), "a's two and b's one are served");
    }
}

#[tokio::test]
async fn under_a_threshold_requests_wait_for_engine_room() {
    let t = Arc::new(Tenants::none());
    let topology = Arc::new(Topology::Colocated { workers: healthy_pool(Role::Both, &["http://w0"], 1) });
    let room = EngineRoom::new(QueueThreshold::Fixed(1));
    let a = Arc::new(Admission::new(100, 100, Duration::from_secs(5), t.clone(), Some((room, topology.clone()))));
    tokio::spawn(a.clone().watch_room());
    let first = a.admit(ticket(&t, "", 0)).await.ok().unwrap();
    let pool = topology.pool(Role::Both).unwrap();
    let mut lease = pool.pick(&Default::default(), &[]).unwrap();
    first.transit().unwrap().picked(Role::Both);
    let second = {
        let (a, t) = (a.clone(), t.clone());
        tokio::spawn(async move { a.admit(ticket(&t, "", 0)).await.is_ok() })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(a.queued(), 1, "the engine's queue is at its threshold: the second waits at the router");
    lease.started();
    assert!(tokio::time::timeout(Duration::from_secs(1), second).await.unwrap().unwrap(), "room again: it goes");
    drop((lease, first));
}
