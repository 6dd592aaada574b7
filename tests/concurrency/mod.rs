//! Many clients racing on one tunnel, on every store: delivery exactly once, limits never overshot.

use std::collections::BTreeSet;

use tokio::task::JoinSet;

use crate::support::says::FULL;
use crate::support::{tunnel_id, Client};

per_store! {
    shared: [racing_consumers_get_each_message_once, racing_producers_respect_limit],
    dedicated: [],
}

/// 20 consumers racing on a tunnel of 200 messages receive each message exactly once overall.
async fn racing_consumers_get_each_message_once(api: &Client) {
    let t = tunnel_id("race-consume");
    let produced: BTreeSet<String> = api.produce_numbered(&t, 200).await.into_iter().collect();
    let mut consumers = JoinSet::new();
    for _ in 0..20 {
        let (api, t) = (api.clone(), t.clone());
        consumers.spawn(async move { drain(&api, &t).await });
    }
    let mut ids = BTreeSet::new();
    let mut bodies = BTreeSet::new();
    let mut deliveries = 0;
    while let Some(received) = consumers.join_next().await {
        for (id, body) in received.expect("a consumer does not panic") {
            deliveries += 1;
            ids.insert(id);
            bodies.insert(body);
        }
    }
    assert_eq!(
        deliveries, 200,
        "some messages were delivered twice or not at all"
    );
    assert_eq!(ids, produced);
    assert_eq!(bodies, (0..200).map(|i| format!("m{i}")).collect());
}

/// Consumes until the tunnel is empty; answers (id, body) of every message received.
async fn drain(api: &Client, t: &str) -> Vec<(String, String)> {
    let mut received = Vec::new();
    loop {
        let response = api.consume(t, "").await;
        match response.status {
            200 => received.push((response.message_id(), response.text())),
            204 => return received,
            _ => panic!("unexpected consume answer: {response:?}"),
        }
    }
}

/// 200 producers racing against `limit=10` store exactly 10 messages: 10 × 201 and 190 × 507.
async fn racing_producers_respect_limit(api: &Client) {
    let t = tunnel_id("race-produce");
    let mut producers = JoinSet::new();
    for i in 0..200 {
        let (api, path) = (api.clone(), format!("/t/{t}?limit=10"));
        producers.spawn(async move { api.post(&path, format!("p{i}")).await });
    }
    let (mut stored, mut refused) = (0, 0);
    while let Some(response) = producers.join_next().await {
        let response = response.expect("a producer does not panic");
        match response.status {
            201 => stored += 1,
            507 => {
                response.expect_error(507, FULL);
                refused += 1;
            }
            _ => panic!("unexpected produce answer: {response:?}"),
        }
    }
    assert_eq!((stored, refused), (10, 190));
    assert_eq!(api.len(&t).await, 10);
}
