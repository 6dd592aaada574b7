//! Replies (routes 5, 6 and 7).

use std::time::Instant;

use super::consume::assert_waited;
use crate::support::{assert_prompt_wake, let_polls_start, spawn_get, tunnel_id, Client};

/// Produces one message on a fresh tunnel and takes it in pending mode; answers (tunnel, id).
async fn pending_message(api: &Client, tag: &str) -> (String, String) {
    let t = tunnel_id(tag);
    let id = api.produce(&t, "question").await;
    assert_eq!(
        api.consume(&t, "?pending").await.expect(200).message_id(),
        id
    );
    (t, id)
}

/// A reply acknowledges its pending message and is read back once, with its Content-Type.
pub(super) async fn reply_round_trip(api: &Client) {
    let (t, id) = pending_message(api, "reply").await;
    let reply = format!("/t/{t}/{id}/reply");
    let posted = api
        .post_typed(&reply, "application/json", r#"{"answer":42}"#)
        .await;
    assert!(posted.expect(201).body.is_empty());
    assert_eq!(api.status(&t, &id).await, 204);
    assert_eq!(api.len(&t).await, 0);
    let read = api.get(&reply).await.expect(200);
    assert_eq!(read.header("content-type"), Some("application/json"));
    assert_eq!(read.text(), r#"{"answer":42}"#);
    api.get(&reply).await.expect_empty();
}

/// A reply posted without Content-Type is read back as `text/plain`.
pub(super) async fn reply_without_content_type_gets_default(api: &Client) {
    let (t, id) = pending_message(api, "replyuntyped").await;
    let reply = format!("/t/{t}/{id}/reply");
    api.post(&reply, "plain answer").await.expect(201);
    let read = api.get(&reply).await.expect(200);
    assert_eq!(
        (read.header("content-type"), read.text().as_str()),
        (Some("text/plain"), "plain answer")
    );
}

/// A reply to a message that is not pending is 204 and stores nothing.
pub(super) async fn reply_to_non_pending_is_204(api: &Client) {
    // Never consumed: the message stays queued.
    let t = tunnel_id("replyqueued");
    let id = api.produce(&t, "queued").await;
    assert_reply_refused(api, &t, &id).await;
    assert_eq!(api.status(&t, &id).await, 201);

    // Consumed without pending.
    let t = tunnel_id("replyconsumed");
    let id = api.produce(&t, "taken").await;
    api.consume(&t, "").await.expect(200);
    assert_reply_refused(api, &t, &id).await;

    // Acknowledged.
    let (t, id) = pending_message(api, "replyacked").await;
    api.delete(&format!("/t/{t}/{id}")).await.expect_empty();
    assert_reply_refused(api, &t, &id).await;

    // Already replied: the second reply neither overwrites nor adds to the first.
    let (t, id) = pending_message(api, "replytwice").await;
    let reply = format!("/t/{t}/{id}/reply");
    api.post(&reply, "first").await.expect(201);
    api.post(&reply, "second").await.expect_empty();
    assert_eq!(api.get(&reply).await.expect(200).text(), "first");
    api.get(&reply).await.expect_empty();
}

/// Posting a reply to `id` answers 204, and there is no reply to read afterwards.
async fn assert_reply_refused(api: &Client, t: &str, id: &str) {
    let reply = format!("/t/{t}/{id}/reply");
    api.post(&reply, "unwanted").await.expect_empty();
    api.get(&reply).await.expect_empty();
}

/// A reply poll waiting while the reply is posted gets it promptly.
pub(super) async fn reply_poll_wakes_on_reply(api: &Client) {
    let (t, id) = pending_message(api, "replypoll").await;
    let poll = spawn_get(api, format!("/t/{t}/{id}/reply/poll?timeout=5"));
    let_polls_start(api, 1).await;
    api.post_typed(&format!("/t/{t}/{id}/reply"), "text/csv", "a,b")
        .await
        .expect(201);
    let replied = Instant::now();
    let (read, _) = poll.await.expect("the poll task does not panic");
    let read = read.expect(200);
    assert_eq!(
        (read.header("content-type"), read.text().as_str()),
        (Some("text/csv"), "a,b")
    );
    assert_prompt_wake(replied);
}

/// A reply poll with no reply answers 204 at its timeout.
pub(super) async fn reply_poll_times_out(api: &Client) {
    let (t, id) = pending_message(api, "replypollempty").await;
    let started = Instant::now();
    api.get(&format!("/t/{t}/{id}/reply/poll?timeout=1"))
        .await
        .expect_empty();
    assert_waited(started.elapsed(), 1);
}
