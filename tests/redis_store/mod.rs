//! What only the redis store has: the original's key layout, several relays on one redis-server, and
//! surviving a store outage.

use std::io::BufRead;
use std::time::{Duration, Instant};

use crate::support::process::signal_pid;
use crate::support::redis::Value;
use crate::support::redis_proxy::RedisProxy;
use crate::support::{
    assert_prompt_wake, eventually, let_polls_start, shared_redis, spawn_get, tunnel_id, wait_until,
};
use crate::support::{Backend, Relay, Store};
use crate::support::{Client, RedisServer};

/// The shared redis relay and the redis-server under it.
fn shared() -> (Client, &'static RedisServer) {
    (Backend::Redis.shared().client(), shared_redis())
}

/// Messages the Lua relay wrote with `XADD` are consumed through Burrow with body, type and id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_messages_written_by_original() {
    let (api, redis) = shared();
    let t = tunnel_id("lua-messages");
    let stream = format!("t:{t}:s");
    let typed = redis
        .command(&[
            "XADD",
            &stream,
            "*",
            "data",
            "hello",
            "ct",
            "application/json",
        ])
        .text();
    let untyped = redis
        .command(&["XADD", &stream, "*", "data", "plain"])
        .text();
    // Types the original stored as they came, which cannot be a header (or not as they are):
    // the default instead. ARGV[2] = "ff" appends a byte that is not UTF-8, which the arguments
    // here, text, cannot carry.
    let add = "local ct = ARGV[1]; if ARGV[2] == 'ff' then ct = ct .. string.char(255) end; \
               return redis.call('XADD', KEYS[1], '*', 'data', 'odd', 'ct', ct)";
    let unwritable = [("", ""), ("a\nb", ""), (" \t", ""), ("text/", "ff")]
        .map(|(ct, byte)| redis.command(&["EVAL", add, "1", &stream, ct, byte]).text());
    let expected = [
        (typed, "hello", "application/json"),
        (untyped, "plain", "text/plain"),
    ]
    .into_iter()
    .chain(unwritable.map(|id| (id, "odd", "text/plain")));
    for (id, body, content_type) in expected {
        let consumed = api.consume(&t, "").await.expect(200);
        assert_eq!(consumed.message_id(), id);
        assert_eq!(consumed.text(), body);
        assert_eq!(consumed.header("content-type"), Some(content_type));
    }
}

/// A store that refuses writes for a while (out of memory, a replica during a failover) is a 503
/// that stores nothing; a reply it refuses leaves the message pending, to be answered again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_are_503_and_keep_the_message() {
    let redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[]);
    let api = relay.client();
    let t = tunnel_id("refused");
    let id = api.produce(&t, "job").await;
    api.consume(&t, "?pending").await.expect(200);
    redis.command(&["CONFIG", "SET", "maxmemory", "1"]);
    assert_refused(&api, &t, &id).await;
    redis.command(&["CONFIG", "SET", "maxmemory", "0"]);
    let nowhere = crate::support::process::free_port().to_string();
    redis.command(&["REPLICAOF", "127.0.0.1", &nowhere]);
    assert_refused(&api, &t, &id).await;
    redis.command(&["REPLICAOF", "NO", "ONE"]);
    // A reply key of another type fails the reply (500) before the message is touched.
    let reply_key = format!("t:{t}:r-{id}");
    redis.command(&["HSET", &reply_key, "f", "v"]);
    let reply = api.post(&format!("/t/{t}/{id}/reply"), "result").await;
    reply.expect_one_line_error(500);
    assert_eq!(api.status(&t, &id).await, 202, "still pending");
    redis.command(&["DEL", &reply_key]);
    assert_eq!(
        api.post(&format!("/t/{t}/{id}/reply"), "result")
            .await
            .status,
        201
    );
    assert_eq!(
        api.get(&format!("/t/{t}/{id}/reply"))
            .await
            .expect(200)
            .text(),
        "result"
    );
    assert_eq!(api.len(&t).await, 0, "nothing produced while refused");
}

/// A server whose ACL refuses the announcements (no `PUBLISH`) refuses produces and replies
/// whole: the client is told 500 and nothing was stored, so a retry cannot store it twice. The
/// reply's message stays pending, to be answered by an instance the server lets announce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_announcement_stores_nothing() {
    let redis = RedisServer::start();
    let user = [
        "ACL", "SETUSER", "mute", "on", ">pw", "~*", "&*", "+@all", "-publish",
    ];
    redis.command(&user);
    let mute_url = redis.url().replace("redis://", "redis://mute:pw@");
    let mute = Relay::start(Store::Redis(&redis), &[("REDIS_URL", mute_url.as_str())]);
    let relay = Relay::start(Store::Redis(&redis), &[]);
    let (api, muted) = (relay.client(), mute.client());
    let t = tunnel_id("mute");
    muted
        .post(&format!("/t/{t}"), "refused")
        .await
        .expect_one_line_error(500);
    let job = muted
        .post(&format!("/trigger?queue={t}"), r#"{"n":1}"#)
        .await;
    job.expect_one_line_error(500);
    assert_eq!(api.len(&t).await, 0, "nothing stored");
    let id = api.produce(&t, "question").await;
    api.consume(&t, "?pending").await.expect(200);
    let reply = format!("/t/{t}/{id}/reply");
    muted
        .post(&reply, "answer")
        .await
        .expect_one_line_error(500);
    assert_eq!(api.status(&t, &id).await, 202, "still pending");
    assert_eq!(api.post(&reply, "answer").await.status, 201);
    assert_eq!(api.get(&reply).await.expect(200).text(), "answer");
}

/// A server that evicts keys under memory pressure is named at start-up (its evictions would take
/// queued messages); one that refuses writes instead is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_store_is_named_at_start_up() {
    let redis = RedisServer::start();
    redis.command(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let warned = Relay::start(Store::Redis(&redis), &[]);
    let said = "redis: maxmemory-policy is allkeys-lru";
    let named = wait_until(Duration::from_secs(10), || warned.output().contains(said));
    assert!(named, "{}", warned.output());
    // With noeviction the check (seen at debug level) warns of nothing.
    redis.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let quiet = Relay::start(
        Store::Redis(&redis),
        &[("RUST_LOG", "warn,burrow::store=debug")],
    );
    let checked = || quiet.output().contains("maxmemory-policy is noeviction");
    assert!(
        wait_until(Duration::from_secs(10), checked),
        "{}",
        quiet.output()
    );
    let output = quiet.output();
    assert!(
        !output.contains("WARN  burrow::store::redis] redis: maxmemory"),
        "{output}"
    );
}

/// A server that refuses the relay's password is reported as such, once, not only as unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_password_is_named() {
    let redis = RedisServer::start();
    redis.command(&["CONFIG", "SET", "requirepass", "sekret"]);
    let relay = Relay::start(Store::Redis(&redis), &[("REDIS_PASSWORD", "wrong")]);
    let named = wait_until(Duration::from_secs(10), || {
        relay.output().contains("WRONGPASS")
    });
    assert!(named, "{}", relay.output());
    relay
        .client()
        .post("/t/x", "x")
        .await
        .expect_one_line_error(503);
    let output = relay.output();
    let refusals = output.lines().filter(|line| line.contains("WRONGPASS"));
    assert_eq!(refusals.count(), 1, "{output}");
}

/// A server that takes the relay's connection but not its subscriptions (an ACL without
/// pub/sub) is named as such at start-up, not as unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_subscription_is_named() {
    let redis = RedisServer::start();
    let user = [
        "ACL", "SETUSER", "nopubsub", "on", ">pw", "~*", "&*", "+@all", "-@pubsub",
    ];
    redis.command(&user);
    let url = redis.url().replacen("redis://", "redis://nopubsub:pw@", 1);
    let relay = Relay::start(Store::Redis(&redis), &[("REDIS_URL", url.as_str())]);
    let said = "redis: connected, but not subscribed to its channels at start-up";
    let named = wait_until(Duration::from_secs(10), || relay.output().contains(said));
    let output = relay.output();
    assert!(named, "{output}");
    assert!(output.contains("NOPERM"), "{output}");
    assert!(!output.contains("not reachable"), "{output}");
}

/// Store failures left out of the log (a line per 10 s at most) are told once 10 s have passed,
/// even when no more come: an outage shorter than that does not end with them untold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn left_out_store_failures_are_told() {
    let redis = RedisServer::start();
    redis.command(&["CONFIG", "SET", "requirepass", "sekret"]);
    let relay = Relay::start(Store::Redis(&redis), &[("REDIS_PASSWORD", "wrong")]);
    let api = relay.client();
    for _ in 0..3 {
        api.post("/t/x", "x").await.expect_one_line_error(503);
    }
    let told = wait_until(Duration::from_secs(15), || {
        relay
            .output()
            .contains("] 2 more store failures since the last line")
    });
    assert!(told, "{}", relay.output());
}

/// A reply and a produce are refused with 503, and the message stays pending.
async fn assert_refused(api: &Client, t: &str, id: &str) {
    let reply = api.post(&format!("/t/{t}/{id}/reply"), "result").await;
    let reply = reply.expect_one_line_error(503);
    assert_eq!(reply.header("retry-after"), Some("1"));
    api.post(&format!("/t/{t}"), "more")
        .await
        .expect_one_line_error(503);
    assert_eq!(api.status(t, id).await, 202, "still pending");
}

/// A clear keeps the stream's last id: the next message's id is larger than any the tunnel gave
/// out, even one in the future (here written by hand), so no reply of a cleared message is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_keeps_the_last_id() {
    let (api, redis) = shared();
    let t = tunnel_id("clear-last-id");
    let stream = format!("t:{t}:s");
    let future = "9999999999999-5";
    assert_eq!(
        redis
            .command(&["XADD", &stream, future, "data", "x"])
            .text(),
        future
    );
    api.consume(&t, "?pending").await.expect(200);
    api.delete(&format!("/t/{t}/all")).await.expect_empty();
    assert_eq!(redis.command(&["XLEN", &stream]).int(), 0);
    let after = api.produce(&t, "new").await;
    assert_eq!(after, "9999999999999-6");
    assert_eq!(api.consume(&t, "?pending").await.expect(200).text(), "new");
}

/// With `BURROW_EMPTY_TUNNEL_TTL`, a stream that a consume, an acknowledgement, a reply or a clear
/// leaves empty is set to expire; one that holds a message (pending ones included) never is, and
/// a produce takes the expiry away. Once expired, the tunnel works as a new one. Without the
/// setting, streams are kept, as the original kept them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptied_streams_expire_when_asked() {
    let redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[("BURROW_EMPTY_TUNNEL_TTL", "60")]);
    let api = relay.client();
    let t = tunnel_id("emptied");
    let stream = format!("t:{t}:s");
    let ttl = || redis.command(&["PTTL", &stream]).int();
    let expiring = |ms: i64| ms > 0 && ms <= 60_000;
    api.produce_numbered(&t, 2).await;
    api.consume(&t, "").await.expect(200);
    assert_eq!(ttl(), -1, "a message is left");
    api.consume(&t, "").await.expect(200);
    assert!(expiring(ttl()), "consumed: {}", ttl());
    let acked = api.produce(&t, "acked").await;
    assert_eq!(ttl(), -1, "produced");
    api.consume(&t, "?pending").await.expect(200);
    assert_eq!(ttl(), -1, "a message is pending");
    api.delete(&format!("/t/{t}/{acked}")).await.expect_empty();
    assert!(expiring(ttl()), "acknowledged: {}", ttl());
    let replied = api.produce(&t, "replied").await;
    api.consume(&t, "?pending").await.expect(200);
    api.post(&format!("/t/{t}/{replied}/reply"), "r")
        .await
        .expect(201);
    assert!(expiring(ttl()), "replied: {}", ttl());
    api.produce(&t, "cleared").await;
    api.delete(&format!("/t/{t}/all")).await.expect_empty();
    assert!(expiring(ttl()), "cleared: {}", ttl());
    // A message trimmed while pending keeps its pending entry, and may still be answered: the
    // stream is not empty until it is.
    let trimmed = api.produce(&t, "trimmed").await;
    api.consume(&t, "?pending").await.expect(200);
    redis.command(&["XTRIM", &stream, "MAXLEN", "0"]);
    api.produce(&t, "last").await;
    api.consume(&t, "").await.expect(200);
    assert_eq!(ttl(), -1, "an entry is pending");
    let answer = format!("/t/{t}/{trimmed}/reply");
    api.post(&answer, "late").await.expect(201);
    assert!(expiring(ttl()), "answered: {}", ttl());
    // A pending consume that acknowledges away an entry whose message is gone empties it too.
    api.produce(&t, "orphan").await;
    api.consume(&t, "?pending").await.expect(200);
    redis.command(&["XTRIM", &stream, "MAXLEN", "0"]);
    assert_eq!(ttl(), -1, "an entry is pending");
    api.consume(&t, "?pending").await.expect(204);
    assert!(expiring(ttl()), "acknowledged away: {}", ttl());
    // Expired, the tunnel is new again.
    redis.command(&["PEXPIRE", &stream, "1"]);
    let gone = wait_until(Duration::from_secs(5), || {
        redis.command(&["EXISTS", &stream]).int() == 0
    });
    assert!(gone, "the stream expired");
    let again = api.produce(&t, "again").await;
    api.consume(&t, "?pending").await.expect(200);
    api.delete(&format!("/t/{t}/{again}")).await.expect_empty();

    let kept = Relay::start(Store::Redis(&redis), &[]);
    let (api, k) = (kept.client(), tunnel_id("kept"));
    api.produce(&k, "m").await;
    api.consume(&k, "").await.expect(200);
    assert_eq!(redis.command(&["PTTL", &format!("t:{k}:s")]).int(), -1);
}

/// A poll waiting on Burrow finds a message the Lua relay wrote (which publishes no wake-up) through
/// the periodic re-check, within about a second: on a new tunnel, and on one whose consumers' group
/// exists and holds a message out with a consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_finds_messages_the_original_wrote() {
    let (api, redis) = shared();
    let t = tunnel_id("lua-poll");
    found_when_written(&api, redis, &t, "silent").await;
    api.produce(&t, "taken").await;
    api.consume(&t, "?pending=300").await.expect(200);
    found_when_written(&api, redis, &t, "silent again").await;
}

/// Writes `body` to `tunnel` as the Lua relay does while a poll waits there, and checks that the
/// poll gets it within about a second.
async fn found_when_written(api: &Client, redis: &RedisServer, tunnel: &str, body: &str) {
    let poll = spawn_get(api, format!("/t/{tunnel}/poll?timeout=10"));
    let_polls_start(api, 1).await;
    let id = redis
        .command(&["XADD", &format!("t:{tunnel}:s"), "*", "data", body])
        .text();
    let written = Instant::now();
    let (response, _) = poll.await.expect("the poll task does not panic");
    let response = response.expect(200);
    assert_eq!((response.message_id(), response.text()), (id, body.into()));
    let late = written.elapsed();
    assert!(
        late < Duration::from_millis(2500),
        "found {late:?} after the write"
    );
}

/// A poll whose tunnel's key is made unreadable behind the relay's back (a string, not a stream) is
/// woken by the re-check and told why, rather than left to its timeout; a key that cannot be read
/// does not fail the re-check of the keys beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_on_a_key_made_unreadable_is_told_why() {
    let (api, redis) = shared();
    let t = tunnel_id("lua-broken");
    let poll = spawn_get(&api, format!("/t/{t}/poll?timeout=20"));
    let_polls_start(&api, 1).await;
    redis.command(&["SET", &format!("t:{t}:s"), "not a stream"]);
    let (response, waited) = poll.await.expect("the poll task does not panic");
    response.expect_error(500, "Internal store error");
    assert!(waited < Duration::from_secs(15), "left to its timeout");
}

/// Burrow writes the original layout: stream fields, group, consumer, and reply keys with a TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_original_layout() {
    let (api, redis) = shared();
    let t = tunnel_id("layout");
    let (stream, group) = (format!("t:{t}:s"), format!("t:{t}:g"));
    let typed = api
        .post_typed(&format!("/t/{t}"), "application/json", "{}")
        .await;
    let typed = typed.expect(201).message_id();
    let untyped = api.produce(&t, "bare").await;
    let entries = redis.command(&["XRANGE", &stream, "-", "+"]);
    let fields: Vec<(String, Vec<(String, String)>)> = entries
        .items()
        .iter()
        .map(|entry| (entry.items()[0].text(), entry.items()[1].pairs()))
        .collect();
    let pair = |k: &str, v: &str| (k.to_owned(), v.to_owned());
    assert_eq!(
        fields,
        [
            (
                typed.clone(),
                vec![pair("data", "{}"), pair("ct", "application/json")]
            ),
            (untyped, vec![pair("data", "bare")]),
        ]
    );

    assert_eq!(
        api.consume(&t, "?pending").await.expect(200).message_id(),
        typed
    );
    let groups = redis.command(&["XINFO", "GROUPS", &stream]);
    let names: Vec<String> = groups.items().iter().map(|g| field(g, "name")).collect();
    assert_eq!(names, [group.as_str()]);
    let pending = redis.command(&["XPENDING", &stream, &group]);
    let consumers = pending.items()[3].items()[0].items()[0].text();
    assert_eq!(consumers, format!("c-{t}"));

    api.post_typed(&format!("/t/{t}/{typed}/reply"), "text/csv", "a,b")
        .await
        .expect(201);
    for (key, kind) in [
        (format!("t:{t}:r-{typed}"), "list"),
        (format!("t:{t}:rt-{typed}"), "string"),
    ] {
        assert_eq!(redis.command(&["TYPE", &key]).text(), kind, "{key}");
        let ttl = redis.command(&["TTL", &key]).int();
        assert!((1..=86_400).contains(&ttl), "{key} has TTL {ttl}");
    }
}

/// A job's message and its record are written by one script call, so a store that fails between
/// two calls cannot leave a job queued that `/done` does not know (its record has the reply TTL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_and_record_are_stored_together() {
    let (api, redis) = shared();
    let queue = tunnel_id("jobrecord");
    let mut monitor = redis.monitor();
    let triggered = api.post(&format!("/trigger?queue={queue}"), "{}").await;
    let job = triggered.expect(202).json()["id"]
        .as_str()
        .expect("a job id")
        .to_owned();
    let msg = job
        .rsplit('.')
        .next()
        .expect("the id ends with the message id");
    let key = format!("burrow:job:{queue}:{msg}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let set = std::iter::from_fn(|| {
        let mut line = String::new();
        monitor.read_line(&mut line).ok()?;
        (Instant::now() < deadline).then_some(line)
    })
    .find(|line| line.contains(&format!("\"{key}\"")))
    .expect("the record is written");
    assert!(set.contains("[0 lua]"), "written outside the script: {set}");
    let ttl = redis.command(&["TTL", &key]).int();
    assert!((1..=86_400).contains(&ttl), "{key} has TTL {ttl}");
}

/// A reply the Lua relay wrote (`RPUSH` + `SET`) is read through Burrow's `GET …/reply`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_reply_written_by_original() {
    let (api, redis) = shared();
    let t = tunnel_id("lua-reply");
    let msg = "1746450313373-0";
    redis.command(&["RPUSH", &format!("t:{t}:r-{msg}"), "from lua"]);
    redis.command(&[
        "SET",
        &format!("t:{t}:rt-{msg}"),
        "application/xml",
        "EX",
        "60",
    ]);
    let read = api.get(&format!("/t/{t}/{msg}/reply")).await.expect(200);
    assert_eq!(read.text(), "from lua");
    assert_eq!(read.header("content-type"), Some("application/xml"));
    api.get(&format!("/t/{t}/{msg}/reply")).await.expect_empty();
}

/// A poll waiting on one relay gets a message produced through another within milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_wakes_across_instances() {
    let (a, _) = shared();
    let other = Backend::Redis.start(&[]);
    let b = other.client();
    let t = tunnel_id("cross-poll");
    let poll = spawn_get(&a, format!("/t/{t}/poll?timeout=10"));
    let_polls_start(&a, 1).await;
    let id = b.produce(&t, "across").await;
    let produced = Instant::now();
    let (consumed, _) = poll.await.expect("the poll task does not panic");
    assert_eq!(consumed.expect(200).message_id(), id);
    assert_prompt_wake(produced);
}

/// A reply poll waiting on one relay gets a reply posted through another within milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_poll_wakes_across_instances() {
    let (a, _) = shared();
    let other = Backend::Redis.start(&[]);
    let b = other.client();
    let t = tunnel_id("cross-reply");
    let id = a.produce(&t, "question").await;
    b.consume(&t, "?pending").await.expect(200);
    let poll = spawn_get(&a, format!("/t/{t}/{id}/reply/poll?timeout=10"));
    let_polls_start(&a, 1).await;
    b.post(&format!("/t/{t}/{id}/reply"), "answer")
        .await
        .expect(201);
    let replied = Instant::now();
    let (read, _) = poll.await.expect("the poll task does not panic");
    assert_eq!(read.expect(200).text(), "answer");
    assert_prompt_wake(replied);
}

/// A fresh relay serves tunnels as soon as `/health` says it is up: the store is reachable, so no 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_work_once_healthy() {
    let relay = Relay::start(Store::Redis(shared_redis()), &[]);
    let api = relay.client();
    let t = tunnel_id("fresh");
    api.produce(&t, "first request").await;
    assert_eq!(
        api.consume(&t, "").await.expect(200).text(),
        "first request"
    );
}

/// With redis-server down, requests answer 503 + `Retry-After: 1`; after it returns they work. A
/// command handed to a connection in the instant between its loss and the first reconnection
/// attempt (10–20 ms) waits for the answer timeout (6 s); later ones fail at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_outage_is_503_then_recovers() {
    let mut redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[]);
    let api = relay.client();
    let t = tunnel_id("outage");
    api.produce(&t, "before").await;

    redis.stop();
    let requests = [
        api.request(reqwest::Method::POST, &format!("/t/{t}"))
            .body("during"),
        api.request(reqwest::Method::GET, &format!("/t/{t}")),
        api.request(reqwest::Method::POST, &format!("/t/{t}"))
            .body("during"),
    ];
    for request in requests {
        let started = Instant::now();
        let response = api.send(request).await.expect_one_line_error(503);
        assert_eq!(response.header("retry-after"), Some("1"), "{response:?}");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(7), "503 took {took:?}");
    }
    // One line about the outage, not one per request.
    let output = relay.output();
    let requests_failing = |line: &&str| line.contains("burrow::http") && line.contains("store");
    let logged = output.lines().filter(requests_failing).count();
    assert_eq!(logged, 1, "{output}");
    api.get("/health").await.expect(200);

    redis.restart();
    let recovered = eventually_produces(&api, &t, Duration::from_secs(10)).await;
    assert!(recovered, "the relay did not recover:\n{}", relay.output());
    assert_eq!(api.consume(&t, "").await.expect(200).text(), "after");
}

/// Events need the relay's own pub/sub subscription: while redis is down, and after it returns
/// until the relay has subscribed again, publishing and subscribing answer 503; an event answered
/// 202 reaches the relay's subscribers (some were lost in that window, counted as reached).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_wait_for_the_subscription() {
    use futures_util::StreamExt;
    let mut redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[]);
    let api = relay.client();
    let topic = tunnel_id("outage");
    let url = format!("{}/ws/e/{topic}", api.base().replacen("http", "ws", 1));
    let (mut subscriber, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the relay accepts the WebSocket");
    let publish = |n: usize| {
        let api = api.clone();
        let path = format!("/e/{topic}");
        async move { api.post(&path, n.to_string()).await }
    };
    publish(0).await.expect(202);

    redis.stop();
    // Only the status: an accepted subscription is a stream that does not end.
    let refused = eventually(Duration::from_secs(10), || async {
        let subscribing = api.request(reqwest::Method::GET, &format!("/e/{topic}"));
        let answer = subscribing.send().await.expect("the relay answers");
        answer.status().as_u16() == 503
    });
    assert!(
        refused.await,
        "a subscription was accepted with the store down"
    );
    publish(1).await.expect_one_line_error(503);

    redis.restart();
    let mut reached = vec![0];
    let mut n = 2;
    while reached.len() < 30 {
        let answer = publish(n).await;
        match answer.status {
            202 => reached.push(n),
            503 => {}
            other => panic!("publish answered {other}"),
        }
        n += 1;
    }
    for expected in reached {
        let frame = tokio::time::timeout(Duration::from_secs(5), subscriber.next()).await;
        let frame = frame
            .expect("an event within 5 s")
            .expect("open")
            .expect("a frame");
        assert_eq!(
            frame.into_text().expect("text").as_str(),
            expected.to_string()
        );
    }
}

/// A publish that no subscription received although this instance has a subscriber of its topic —
/// the relay's own subscriber connection was dropped by the server and the relay has not noticed
/// yet — is refused with 503, not accepted as delivered.
#[tokio::test]
async fn publish_that_reached_no_subscription_is_refused() {
    let redis = RedisServer::start();
    let proxy = RedisProxy::start(&redis);
    let relay = through(&proxy, &redis);
    let api = relay.client();
    let topic = tunnel_id("unheard");
    let _subscriber = crate::events::Sse::open(&api, &topic).await;
    api.post(&format!("/e/{topic}"), "heard").await.expect(202);

    proxy.cut_subscribers();
    let forgotten = wait_until(Duration::from_secs(10), || {
        subscriptions(&redis, &topic) == 0
    });
    assert!(
        forgotten,
        "redis-server still counts the relay's subscription"
    );
    api.post(&format!("/e/{topic}"), "unheard")
        .await
        .expect_one_line_error(503);
}

/// An instance takes a topic's events only while it has subscribers of it: its subscriber
/// connection subscribes the topic's channel before the first is told it is subscribed, and
/// leaves it within seconds of the last one leaving. Publishing there needs no subscription.
#[tokio::test]
async fn topics_are_heard_while_they_have_subscribers() {
    let redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[]);
    let api = relay.client();
    let topic = tunnel_id("heard");
    api.post(&format!("/e/{topic}"), "nobody").await.expect(202);
    assert_eq!(subscriptions(&redis, &topic), 0);
    assert_eq!(redis.command(&["PUBSUB", "NUMPAT"]).int(), 0);

    let first = crate::events::Sse::open(&api, &topic).await;
    assert_eq!(subscriptions(&redis, &topic), 1);
    let mut second = crate::events::Sse::open(&api, &topic).await;
    assert_eq!(subscriptions(&redis, &topic), 1, "one channel per topic");
    drop(first);
    api.post(&format!("/e/{topic}"), "still").await.expect(202);
    assert_eq!(second.next_event().await, "still");
    drop(second);
    assert!(
        channel_left(&redis, &topic).await,
        "the relay still takes the events of a topic nobody reads"
    );
    let mut again = crate::events::Sse::open(&api, &topic).await;
    api.post(&format!("/e/{topic}"), "back").await.expect(202);
    assert_eq!(again.next_event().await, "back");
}

/// A subscriber is answered only once the server has subscribed its topic's channel: with the
/// server stopped, subscribing to a new topic is 503 after 2 s, not a 200 after which events
/// published could run at the server before the subscription and be missed. The SUBSCRIBE the
/// server runs late is undone.
#[tokio::test]
async fn subscribing_waits_for_the_server() {
    let redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[]);
    let api = relay.client();
    let topic = tunnel_id("unconfirmed");
    let pid = redis.pid();
    signal_pid(pid, "STOP");
    let asked = api
        .request(reqwest::Method::GET, &format!("/e/{topic}"))
        .send();
    let answer = tokio::time::timeout(Duration::from_secs(10), asked).await;
    signal_pid(pid, "CONT");
    let answer = answer
        .expect("an answer within 10 s")
        .expect("the relay answers");
    assert_eq!(answer.status().as_u16(), 503);
    // The server runs the SUBSCRIBE it was sent once it runs again: the channel is left.
    assert!(
        channel_left(&redis, &topic).await,
        "the refused subscriber's channel stays subscribed"
    );
    let mut subscriber = crate::events::Sse::open(&api, &topic).await;
    api.post(&format!("/e/{topic}"), "after").await.expect(202);
    assert_eq!(subscriber.next_event().await, "after");
}

/// A subscription the server is slow to run holds up no event of the topics already heard: their
/// events are delivered while it waits (before, they waited with it, up to its 2 s deadline, and
/// the new subscriber was then refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_subscription_holds_up_no_event() {
    let redis = RedisServer::start();
    let proxy = RedisProxy::start(&redis);
    let (relay, publisher) = (
        through(&proxy, &redis),
        Relay::start(Store::Redis(&redis), &[]),
    );
    let api = relay.client();
    let (heard, fresh) = (tunnel_id("heard"), tunnel_id("fresh"));
    let mut subscriber = crate::events::Sse::open(&api, &heard).await;

    proxy.hold_subscribers();
    let asking = tokio::spawn(
        api.request(reqwest::Method::GET, &format!("/e/{fresh}"))
            .send(),
    );
    assert!(
        eventually(Duration::from_secs(5), || async { proxy.held() > 0 }).await,
        "the new topic's SUBSCRIBE never reached the proxy"
    );
    let publishing = publisher.client();
    publishing
        .post(&format!("/e/{heard}"), "meanwhile")
        .await
        .expect(202);
    assert_eq!(subscriber.next_event().await, "meanwhile");
    proxy.release();
    let answer = asking
        .await
        .expect("not panicked")
        .expect("the relay answers");
    assert_eq!(
        answer.status().as_u16(),
        200,
        "the new subscriber was refused"
    );
}

/// A pub/sub connection killed over and over, each new one soon after it came, ends subscribed:
/// events are published and delivered again once the kills stop. (A loss reported after the
/// reconnection that followed it once left an instance refusing every event for good; this test
/// did not provoke that race in a dozen runs without the fix, a probe with four relays did.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flapping_subscriber_ends_subscribed() {
    let redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[]);
    let api = relay.client();
    let topic = tunnel_id("flapping");
    let mut subscriber = crate::events::Sse::open(&api, &topic).await;
    for round in 0..4 {
        for kill in 0..40u64 {
            redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
            // The fault, not a wait for anything: kills 5 to 45 ms apart.
            tokio::time::sleep(Duration::from_millis(5 + kill % 5 * 10)).await;
        }
        let event = format!("round {round}");
        let published =
            || async { api.post(&format!("/e/{topic}"), event.clone()).await.status == 202 };
        assert!(
            eventually(Duration::from_secs(10), published).await,
            "events refused after round {round}"
        );
        assert_eq!(subscriber.next_event().await, event);
    }
}

/// Whether no connection takes the events of `topic` within 15 s (the relay's tidy-up runs every
/// 5 s). Awaited, not blocked on: a dropped subscriber's connection closes on the test's runtime.
async fn channel_left(redis: &RedisServer, topic: &str) -> bool {
    eventually(Duration::from_secs(15), || async {
        subscriptions(redis, topic) == 0
    })
    .await
}

/// How many connections take the events of `topic`.
fn subscriptions(redis: &RedisServer, topic: &str) -> i64 {
    let channel = format!("burrow:event:{topic}");
    let answer = redis.command(&["PUBSUB", "NUMSUB", &channel]);
    answer.items()[1].int()
}

/// With redis-server hung (SIGSTOP) under concurrent load, every produce and consume answers 503
/// + `Retry-After: 1`: those queued behind a call at the server within 2 s, those at the server
/// once their connection is deemed dead (5–6 s); once the server runs again, so does the relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_store_answers_every_queued_operation() {
    let redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[]);
    let api = relay.client();
    let t = tunnel_id("hung");
    api.produce(&t, "before").await;
    let pid = redis.pid();
    signal_pid(pid, "STOP");
    let clients: Vec<_> = (0..32).map(|_| Client::new(api.base())).collect();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let t = format!("{t}-{i}");
            tokio::spawn(async move {
                let started = Instant::now();
                let response = match i % 4 {
                    0 => client.consume(&t, "").await,
                    _ => client.post(&format!("/t/{t}"), "during").await,
                };
                (response, started.elapsed())
            })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("the client task does not panic"));
    }
    signal_pid(pid, "CONT");
    for (response, took) in answers {
        let response = response.expect_one_line_error(503);
        assert_eq!(response.header("retry-after"), Some("1"), "{response:?}");
        assert!(took < Duration::from_secs(8), "503 after {took:?}");
    }
    let recovered = eventually_produces(&api, &t, Duration::from_secs(10)).await;
    assert!(recovered, "the relay did not recover:\n{}", relay.output());
    // The relay logs the outage itself; its redis client's own lines (one per connection) are
    // left out, also when RUST_LOG (`warn` here) does not name the client.
    let output = relay.output();
    assert!(!output.contains("fred::"), "{output}");
}

/// A server that is slow to answer (paused for 4 s, as a long script or a fork's stall would)
/// loses nothing: a command already at the server is awaited and answered, and one that was
/// still queued behind it gets 503 after 2 s, having done nothing. Before, a consume or reply read
/// at the server was told 503 while the server took its message later (lost), and a produce was
/// told 503 while stored (sent twice by a client that retries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_store_loses_nothing() {
    let redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[]);
    let api = relay.client();
    let (t, q) = (tunnel_id("slow"), tunnel_id("asked"));
    api.produce_numbered(&t, 3).await;
    let asked = api.produce(&q, "question").await;
    api.consume(&q, "?pending").await.expect(200);
    api.post(&format!("/t/{q}/{asked}/reply"), "answer")
        .await
        .expect(201);

    assert_eq!(
        redis.command(&["CLIENT", "PAUSE", "4000", "ALL"]).text(),
        "OK"
    );
    let paused = Instant::now();
    let reply = format!("/t/{q}/{asked}/reply");
    // Six consumes on two relay threads: on one thread at least, some queue behind the first.
    let consume = || api.request(reqwest::Method::GET, &format!("/t/{t}"));
    let requests = [
        consume(),
        consume(),
        consume(),
        consume(),
        consume(),
        consume(),
        api.request(reqwest::Method::GET, &reply),
        api.request(reqwest::Method::POST, &format!("/t/{t}"))
            .body("late"),
    ];
    let answers = requests.map(|request| {
        let api = api.clone();
        tokio::spawn(async move { (api.send(request).await, paused.elapsed()) })
    });
    let mut answered = Vec::new();
    for answer in answers {
        let (response, took) = answer.await.expect("the client task does not panic");
        // Only a command queued behind another gets 503 here: after 2 s, not when the pause ends.
        let early = Duration::from_millis(3200);
        assert!(response.status != 503 || took < early, "503 after {took:?}");
        answered.push((response.status, response.text()));
    }
    // (Whether any of the six queued behind another depends on how they reach the relay's
    // threads: arriving together, they share one call. The queue's 2 s limit is asserted only
    // where it applies, above.)
    // Every message is either given to one consumer or still queued, the late one only if 201.
    let mut seen: Vec<String> = answered[..6]
        .iter()
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| body.clone())
        .collect();
    loop {
        let response = api.consume(&t, "").await;
        if response.status == 204 {
            break;
        }
        seen.push(response.expect(200).text());
    }
    seen.sort();
    let expected = match answered[7].0 {
        201 => vec!["late", "m0", "m1", "m2"],
        _ => vec!["m0", "m1", "m2"],
    };
    assert_eq!(seen, expected, "{answered:?}");
    // The reply is read once: now, or later if the read was not sent.
    match &answered[6] {
        (200, body) => assert_eq!(body, "answer"),
        (503, _) => assert_eq!(api.get(&reply).await.expect(200).text(), "answer"),
        other => panic!("reply read answered {other:?}"),
    }
    for (status, body) in &answered {
        assert!([200, 201, 204, 503].contains(status), "{status} {body}");
    }
}

/// With redis-server frozen (SIGSTOP) past the point where the relay stops waiting for its calls,
/// consumes, a reply read, a produce and an event's publication answer 503 and, once the server
/// runs again, none of them has done anything: the messages and the reply are still there, the
/// refused message was not stored, the refused event reaches no subscriber. Before, the server ran
/// the calls it found in its sockets when it woke: the consumes took their messages (lost), the
/// produce stored a message its client was told to send again, the event was delivered (twice,
/// once its publisher sent it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_store_loses_nothing() {
    let redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[]);
    loses_nothing_while_frozen(&redis, &relay).await;
}

/// The same with redis 150 ms away: the relay's readings of the server's clock take that long,
/// and still set the fence (they once had to be quicker than 100 ms, and no fence was set).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_distant_store_loses_nothing() {
    let redis = RedisServer::start();
    let proxy = RedisProxy::with_delay(&redis, Duration::from_millis(150));
    let relay = through(&proxy, &redis);
    loses_nothing_while_frozen(&redis, &relay).await;
}

/// Freezes `redis` while `relay` is asked to consume, read a reply, produce and publish (each
/// 503), and checks that none of them did anything once it runs again.
async fn loses_nothing_while_frozen(redis: &RedisServer, relay: &Relay) {
    let api = relay.client();
    let (t, q) = (tunnel_id("frozen"), tunnel_id("asked"));
    api.produce_numbered(&t, 2).await;
    let asked = api.produce(&q, "question").await;
    api.consume(&q, "?pending").await.expect(200);
    let reply = format!("/t/{q}/{asked}/reply");
    api.post(&reply, "answer").await.expect(201);
    let topic = tunnel_id("frozen-events");
    let mut subscriber = crate::events::Sse::open(&api, &topic).await;

    let pid = redis.pid();
    signal_pid(pid, "STOP");
    let requests = [
        api.request(reqwest::Method::GET, &format!("/t/{t}")),
        api.request(reqwest::Method::GET, &format!("/t/{t}")),
        api.request(reqwest::Method::GET, &reply),
        api.request(reqwest::Method::POST, &format!("/t/{t}"))
            .body("refused"),
        api.request(reqwest::Method::POST, &format!("/e/{topic}"))
            .body("refused"),
    ];
    let answers = requests.map(|request| {
        let api = api.clone();
        tokio::spawn(async move { api.send(request).await })
    });
    for answer in answers {
        let response = answer.await.expect("the client task does not panic");
        response.expect_one_line_error(503);
    }
    signal_pid(pid, "CONT");

    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = api.consume(&t, "").await;
        match response.status {
            200 => seen.push(response.text()),
            204 => break,
            // Still reconnecting after the freeze.
            _ => assert!(Instant::now() < deadline, "{response:?}"),
        }
    }
    assert_eq!(seen, ["m0", "m1"]);
    assert_eq!(api.get(&reply).await.expect(200).text(), "answer");
    api.post(&format!("/e/{topic}"), "after").await.expect(202);
    assert_eq!(subscriber.next_event().await, "after");
}

/// When the server's clock steps forward after the relay read it, writes find their fence
/// passed (503, nothing stored) only until the clock is read again, which the first such write
/// asks for at once: not for the seconds until the next regular reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_clock_step_is_read_again_at_once() {
    let redis = RedisServer::start();
    let proxy = RedisProxy::with_clock_stepped(&redis, 10);
    let relay = through(&proxy, &redis);
    let api = relay.client();
    let t = tunnel_id("stepped");
    let refused = api.post(&format!("/t/{t}"), "refused").await;
    refused.expect_one_line_error(503);
    // The next regular reading is 5 s after start-up.
    assert!(eventually_produces(&api, &t, Duration::from_millis(1500)).await);
    assert_eq!(api.consume(&t, "").await.expect(200).text(), "after");
    api.consume(&t, "").await.expect(204);
}

/// Writes that keep finding their fence passed (the clock read is always behind the scripts')
/// ask for the clock to be read again, but not one reading after another: at most ten a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doubted_clock_is_read_at_most_ten_times_a_second() {
    let redis = RedisServer::start();
    let proxy = RedisProxy::with_clock_behind(&redis, 10);
    let relay = through(&proxy, &redis);
    let api = relay.client();
    let t = tunnel_id("behind");
    let before = proxy.clock_readings();
    let started = Instant::now();
    let mut refused = 0;
    while started.elapsed() < Duration::from_secs(1) {
        let response = api.post(&format!("/t/{t}"), "refused").await;
        assert_eq!(response.status, 503, "{response:?}");
        refused += 1;
    }
    let readings = proxy.clock_readings() - before;
    let seconds = started.elapsed().as_secs_f64();
    assert!(readings >= 1, "a refusal asks for a reading");
    assert!(
        (readings as f64) <= 10.0 * seconds + 2.0,
        "{readings} readings in {seconds:.2} s for {refused} refused writes"
    );
}

/// A relay on `redis` that reaches it through `proxy`.
fn through(proxy: &RedisProxy, redis: &RedisServer) -> Relay {
    let url = proxy.url();
    Relay::start(Store::Redis(redis), &[("REDIS_URL", url.as_str())])
}

/// Produces `after` on `t` until it succeeds or `limit` has passed; answers whether it succeeded.
async fn eventually_produces(api: &Client, t: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if api.post(&format!("/t/{t}"), "after").await.status == 201 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// One field of an `XINFO` row (a flat key/value array).
fn field(row: &Value, name: &str) -> String {
    row.pairs()
        .into_iter()
        .find_map(|(key, value)| (key == name).then_some(value))
        .unwrap_or_else(|| panic!("no {name} in {row:?}"))
}

/// Each worker thread sends its commands on a store connection of its own (besides the shared
/// pool and the subscriber), and the count stays fixed however many clients there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_connections_are_per_thread_and_fixed() {
    let redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[("REDIS_POOL_SIZE", "1")]);
    // Connections other than the one asking.
    let relay_connections = || {
        let list = redis.command(&["CLIENT", "LIST"]).text();
        list.lines()
            .filter(|l| !l.contains("cmd=client|list"))
            .count()
    };
    // Many clients, each with its own connection, so both worker threads serve some.
    let traffic = |round: usize| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let api = Client::new(relay.client().base());
                let t = tunnel_id(&format!("conns{round}-{i}"));
                tokio::spawn(async move {
                    api.produce(&t, "x").await;
                    api.consume(&t, "").await.expect(200);
                })
            })
            .collect();
        futures_util::future::join_all(handles)
    };
    traffic(0).await;
    // The pool (1) and the subscriber, plus one per worker thread once its own is up.
    let per_thread = crate::support::eventually(Duration::from_secs(5), || {
        let ready = relay_connections() >= 4;
        async move { ready }
    });
    assert!(
        per_thread.await,
        "{} store connections",
        relay_connections()
    );
    let before = relay_connections();
    traffic(1).await;
    assert_eq!(
        relay_connections(),
        before,
        "more clients opened more store connections"
    );
}

/// Produces and consumes that arrive together on a worker thread reach redis in shared script
/// calls, so there are fewer EVALSHA calls than operations, and every operation is still answered
/// on its own: the tunnel whose key holds another type fails alone (500) while every other
/// operation succeeds, replies and acks (one call each) included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_share_script_calls() {
    let redis = RedisServer::start();
    let relay = Relay::start(Store::Redis(&redis), &[]);
    let bad = tunnel_id("wrongtype");
    redis.command(&["SET", &format!("t:{bad}:s"), "not a stream"]);
    let evalsha_calls = || {
        let stats = redis.command(&["INFO", "commandstats"]).text();
        stats
            .lines()
            .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Loads the scripts and opens the worker threads' own connections.
    let warm = relay.client();
    let t = tunnel_id("warm");
    warm.produce(&t, "x").await;
    warm.consume(&t, "").await.expect(200);
    let before = evalsha_calls();

    const CLIENTS: usize = 64;
    const ROUNDS: usize = 3;
    // One connection each (client 0 asks for the bad tunnel), reused every round.
    let clients: Vec<Client> = (0..=CLIENTS)
        .map(|_| Client::new(relay.client().base()))
        .collect();
    for round in 0..ROUNDS {
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
        let tasks: Vec<_> = (0..=CLIENTS)
            .map(|i| {
                let (api, start) = (clients[i].clone(), start.clone());
                let t = tunnel_id(&format!("batch{round}-{i}"));
                let bad = bad.clone();
                tokio::spawn(async move {
                    // Every client connected first, so that the requests arrive together.
                    api.get("/health").await.expect(200);
                    start.wait().await;
                    if i == 0 {
                        api.post(&format!("/t/{bad}"), "m")
                            .await
                            .expect_one_line_error(500);
                        api.consume(&bad, "?pending")
                            .await
                            .expect_one_line_error(500);
                        let id = "1-0";
                        let reply = format!("/t/{bad}/{id}/reply");
                        api.post(&reply, "r").await.expect_one_line_error(500);
                        api.delete(&format!("/t/{bad}/{id}"))
                            .await
                            .expect_one_line_error(500);
                        return;
                    }
                    // Script calls: 4 for the replied message (produce, consume, reply, take the
                    // reply), 3 for the acknowledged one (produce, consume, ack).
                    let replied = api.produce(&t, &format!("m{i}")).await;
                    let acked = api.produce(&t, &format!("n{i}")).await;
                    let taken = api.consume(&t, "?pending").await.expect(200);
                    assert_eq!(taken.message_id(), replied);
                    let reply = format!("/t/{t}/{replied}/reply");
                    api.post(&reply, format!("r{i}")).await.expect(201);
                    assert_eq!(api.get(&reply).await.expect(200).text(), format!("r{i}"));
                    let taken = api.consume(&t, "?pending").await.expect(200);
                    assert_eq!(taken.message_id(), acked);
                    api.delete(&format!("/t/{t}/{acked}")).await.expect_empty();
                    assert_eq!(api.len(&t).await, 0);
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("the client task does not panic");
        }
    }
    let calls = evalsha_calls() - before;
    // One call each would be 7 per client and 4 for the bad tunnel, 1356 in all (~700 with
    // produces and consumes sharing calls).
    let operations = ((7 * CLIENTS + 4) * ROUNDS) as u64;
    assert!(
        calls < operations,
        "{calls} EVALSHA calls for {operations} operations"
    );
}
