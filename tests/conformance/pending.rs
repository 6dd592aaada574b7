//! Pending mode, acknowledgement (route 4), status (8), len (9) and clear (10).

use std::time::Duration;

use super::consume::assert_waited;
use crate::support::client::id_order;
use crate::support::raw::{Answer, Connection};
use crate::support::{let_polls_start, metric, spawn_get, tunnel_id, Backend, Client};

/// `?pending`, `?pending=` and `?pending=0` hand out the same message until it is acknowledged.
pub(super) async fn pending_consume_redelivers_until_ack(api: &Client) {
    for flag in ["?pending", "?pending=", "?pending=0"] {
        let t = tunnel_id("pending");
        let ids = api.produce_numbered(&t, 2).await;
        for _ in 0..2 {
            let consumed = api.consume(&t, flag).await.expect(200);
            assert_eq!(consumed.message_id(), ids[0], "{flag}");
            assert_eq!(consumed.text(), "m0");
            assert_eq!(api.status(&t, &ids[0]).await, 202, "{flag}");
            assert_eq!(api.len(&t).await, 2, "{flag}: pending messages count");
        }
        api.delete(&format!("/t/{t}/{}", ids[0]))
            .await
            .expect_empty();
        assert_eq!(api.status(&t, &ids[0]).await, 204, "{flag}");
        assert_eq!(api.len(&t).await, 1, "{flag}");
        let next = api.consume(&t, flag).await.expect(200);
        assert_eq!(next.message_id(), ids[1], "{flag}");
    }
}

/// A message produced while several `?pending` polls wait goes to exactly one of them (the others
/// time out); a consumer that asks afterwards gets it again, as pending mode says.
pub(super) async fn pending_polls_share_a_new_message(api: &Client) {
    let t = tunnel_id("pendingpolls");
    let polls: Vec<_> = (0..3)
        .map(|_| spawn_get(api, format!("/t/{t}/poll?pending&timeout=2")))
        .collect();
    let_polls_start(api, 3).await;
    let id = api.produce(&t, "once").await;
    let mut answers = Vec::new();
    for poll in polls {
        let (response, waited) = poll.await.expect("the poll task does not panic");
        if response.status == 204 {
            assert_waited(waited, 2);
        }
        answers.push((
            response.status,
            response.header("x-message-id").map(str::to_owned),
        ));
    }
    answers.sort();
    assert_eq!(
        answers,
        [(200, Some(id.clone())), (204, None), (204, None)],
        "one poll gets the message, the others time out"
    );
    let again = api.consume(&t, "?pending").await.expect(200);
    assert_eq!((again.message_id(), again.text()), (id, "once".to_owned()));
}

/// Acknowledging an unknown id, on a used or an unknown tunnel, answers 204 and changes nothing.
pub(super) async fn ack_unknown_is_204(api: &Client) {
    let t = tunnel_id("ackunknown");
    api.produce(&t, "stays").await;
    api.delete(&format!("/t/{t}/1-0")).await.expect_empty();
    api.delete(&format!("/t/{}/1-0", tunnel_id("nowhere")))
        .await
        .expect_empty();
    assert_eq!(api.len(&t).await, 1);
}

/// A consume without `pending` after a pending consume hands out the next new message.
pub(super) async fn plain_consume_skips_pending(api: &Client) {
    let t = tunnel_id("skippending");
    let ids = api.produce_numbered(&t, 2).await;
    assert_eq!(
        api.consume(&t, "?pending").await.expect(200).message_id(),
        ids[0]
    );
    assert_eq!(api.consume(&t, "").await.expect(200).message_id(), ids[1]);
    assert_eq!(api.status(&t, &ids[0]).await, 202);
}

/// `pending=N` is how long a consumer lets others' messages stay unacknowledged: consumers with a
/// minute's window get newer messages, and one with `pending=1` gets the unacknowledged one back
/// after 1 s.
pub(super) async fn visibility_timeout_redelivers_late(api: &Client) {
    let t = tunnel_id("visibility");
    let ids = api.produce_numbered(&t, 2).await;
    // Consumers with a minute's window: however slow this machine, nothing is due again yet.
    assert_eq!(
        api.consume(&t, "?pending=60")
            .await
            .expect(200)
            .message_id(),
        ids[0]
    );
    assert_eq!(
        api.consume(&t, "?pending=60")
            .await
            .expect(200)
            .message_id(),
        ids[1]
    );
    api.consume(&t, "?pending=60").await.expect_empty();
    // Inherent wait: the visibility timeout has to elapse.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let again = api.consume(&t, "?pending=1").await.expect(200);
    assert_eq!(
        (again.message_id(), again.text()),
        (ids[0].clone(), "m0".to_owned())
    );
}

/// While a tunnel's only message is out with a consumer, the polls waiting on it are left alone by
/// the relay's once-a-second re-check (each reads when it starts and when its time is up, not once
/// a second), except a
/// pending poll whose visibility timeout has run out on it: that one is woken and takes it back.
pub(super) async fn waiters_sleep_while_messages_are_out(backend: Backend) {
    let relay = backend.start(&[]);
    let api = relay.client();
    let metrics = api.metrics().expect("the harness's relays show metrics");
    let consumes = || {
        metric(
            &metrics,
            "burrow_store_duration_seconds_count{op=\"consume\"}",
        )
    };
    let t = tunnel_id("outwithconsumer");
    let id = api
        .post(&format!("/t/{t}"), "m")
        .await
        .expect(201)
        .message_id();
    api.consume(&t, "?pending=300").await.expect(200);

    // Waits through at least one re-check after the message is due for it, well inside its own
    // timeout: only the re-check can hand it the message.
    let taken_back = spawn_get(&api, format!("/t/{t}/poll?pending=2&timeout=20"));
    let (answer, waited) = taken_back.await.expect("the poll ran");
    assert_eq!(answer.expect(200).message_id(), id);
    assert!(
        waited < Duration::from_secs(15),
        "woken only by its timeout: {waited:?}"
    );

    let before = consumes().await;
    let plain = spawn_get(&api, format!("/t/{t}/poll?timeout=3"));
    let pending = spawn_get(&api, format!("/t/{t}/poll?pending=300&timeout=3"));
    plain.await.expect("the poll ran").0.expect_empty();
    pending.await.expect("the poll ran").0.expect_empty();
    assert_eq!(consumes().await - before, 4.0, "two reads per poll");
    // The longest visibility timeout there is, beyond what redis counts in milliseconds.
    let before = consumes().await;
    let longest = spawn_get(&api, format!("/t/{t}/poll?pending={}&timeout=3", u64::MAX));
    longest.await.expect("the poll ran").0.expect_empty();
    assert_eq!(consumes().await - before, 2.0, "two reads");
}

/// A pending message trimmed away (TUNNEL_MAXLEN, no backpressure) is not handed out again: once
/// its visibility timeout has passed, a pending consume skips it for the next message.
pub(super) async fn trimmed_pending_message_is_skipped(backend: Backend) {
    let relay = backend.start(&[("TUNNEL_MAXLEN", "2")]);
    let api = relay.client();
    let t = tunnel_id("trimpending");
    let first = api.post(&format!("/t/{t}?limit=0"), "m0").await;
    let first = first.expect(201).message_id();
    let taken = api.consume(&t, "?pending=1").await.expect(200);
    assert_eq!(taken.message_id(), first);
    for i in 1..=3 {
        let produced = api.post(&format!("/t/{t}?limit=0"), format!("m{i}")).await;
        produced.expect(201);
    }
    // The tunnel now holds m2 and m3. m0's body is gone, but as in a stream's pending list, its
    // consumer still holds it: pending (202) until it would be handed out again.
    assert_eq!(api.len(&t).await, 2);
    assert_eq!(api.status(&t, &first).await, 202);
    // Inherent wait: the visibility timeout has to elapse.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(api.consume(&t, "?pending=1").await.expect(200).text(), "m2");
    assert_eq!(api.status(&t, &first).await, 204);
    // A minute's window from here: m2 must not come back however slow this machine is.
    assert_eq!(
        api.consume(&t, "?pending=60").await.expect(200).text(),
        "m3"
    );
    api.consume(&t, "?pending=60").await.expect_empty();

    // Its consumer can still answer a message trimmed while it worked on it.
    let u = tunnel_id("trimreply");
    let asked = api.post(&format!("/t/{u}?limit=0"), "a0").await;
    let asked = asked.expect(201).message_id();
    api.consume(&u, "?pending=60").await.expect(200);
    for i in 1..=3 {
        let produced = api.post(&format!("/t/{u}?limit=0"), format!("a{i}")).await;
        produced.expect(201);
    }
    let reply = format!("/t/{u}/{asked}/reply");
    api.post(&reply, "answer").await.expect(201);
    assert_eq!(api.get(&reply).await.expect(200).text(), "answer");
    assert_eq!(api.status(&u, &asked).await, 204);
}

/// `pending` that is neither a flag nor a whole number of seconds is 400 and consumes nothing.
pub(super) async fn bad_pending_is_400(api: &Client) {
    let t = tunnel_id("badpending");
    api.produce(&t, "kept").await;
    for pending in ["abc", "-1"] {
        api.consume(&t, &format!("?pending={pending}"))
            .await
            .expect_one_line_error(400);
    }
    assert_eq!(api.consume(&t, "").await.expect(200).text(), "kept");
}

/// Status: 201 queued, 202 pending, 204 unknown id, unknown tunnel, acknowledged or consumed.
pub(super) async fn status_codes(api: &Client) {
    let t = tunnel_id("status");
    let ids = api.produce_numbered(&t, 3).await;
    assert_eq!(api.status(&t, &ids[0]).await, 201);
    api.consume(&t, "?pending").await.expect(200);
    assert_eq!(api.status(&t, &ids[0]).await, 202);
    api.delete(&format!("/t/{t}/{}", ids[0]))
        .await
        .expect_empty();
    assert_eq!(api.status(&t, &ids[0]).await, 204, "acknowledged");
    api.consume(&t, "").await.expect(200);
    assert_eq!(
        api.status(&t, &ids[1]).await,
        204,
        "consumed without pending"
    );
    assert_eq!(api.status(&t, &ids[2]).await, 201);
    assert_eq!(api.status(&t, "1-0").await, 204, "unknown id");
    assert_eq!(
        api.status(&tunnel_id("nowhere"), &ids[2]).await,
        204,
        "unknown tunnel"
    );
}

/// `len` answers 204 with `X-Queue-Size`, pending messages included.
pub(super) async fn len_counts_pending(api: &Client) {
    let t = tunnel_id("len");
    assert_eq!(api.len(&t).await, 0);
    api.produce_numbered(&t, 3).await;
    api.consume(&t, "?pending").await.expect(200);
    assert_eq!(api.len(&t).await, 3);
    api.consume(&t, "").await.expect(200);
    assert_eq!(api.len(&t).await, 2);
}

/// `DELETE /t/x/all` answers 204 with `X-Queue-Size: 0` and removes queued and pending messages.
pub(super) async fn clear_removes_everything(api: &Client) {
    let t = tunnel_id("clear");
    let ids = api.produce_numbered(&t, 2).await;
    api.consume(&t, "?pending").await.expect(200);
    let cleared = api.delete(&format!("/t/{t}/all")).await.expect_empty();
    assert_eq!(cleared.header("x-queue-size"), Some("0"));
    assert_eq!(api.len(&t).await, 0);
    api.consume(&t, "").await.expect_empty();
    api.consume(&t, "?pending").await.expect_empty();
    assert_eq!(
        api.status(&t, &ids[0]).await,
        204,
        "the pending message is gone"
    );
}

/// Ids keep increasing across a clear, also within one millisecond (requests pipelined): a new
/// message never takes the id, and with it the unread reply, of a cleared one.
pub(super) async fn ids_increase_across_clear(api: &Client) {
    let t = tunnel_id("clearids");
    let produce = format!("POST /t/{t} HTTP/1.1\r\nHost: relay\r\nContent-Length: 1\r\n\r\nx");
    let clear = format!("DELETE /t/{t}/all HTTP/1.1\r\nHost: relay\r\n\r\n");
    let rounds: Vec<String> = (0..20)
        .flat_map(|_| [produce.clone(), clear.clone(), produce.clone()])
        .collect();
    let answers = Connection::open(api.base()).await.pipeline(&rounds).await;
    for round in answers.chunks(3) {
        let id = |answer: &Answer| {
            assert_eq!(answer.status, 201, "{answer:?}");
            id_order(answer.header("x-message-id").expect("an id"))
        };
        assert_eq!(round[1].status, 204, "{:?}", round[1]);
        assert!(
            id(&round[0]) < id(&round[2]),
            "ids after a clear: {round:?}"
        );
    }
}
