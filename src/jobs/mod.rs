//! Jobs (PROTOCOL.md part 2): trigger a long-running job, let a worker anywhere do it, collect the
//! result. Built on tunnels: a job queue is a tunnel, a job a message that a worker takes in
//! pending mode, its result the message's reply. The job's fields are also kept as a job record,
//! so that any instance can answer for it while it runs and once it is done.
//!
//! Workers mark a failure by replying with Content-Type `application/problem+json` (RFC 9457);
//! its `detail` becomes the job's `error`. Store-agnostic: this speaks only to [`Tunnels`] and
//! the [`Store`].

mod id;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use base64::prelude::{Engine, BASE64_STANDARD};
use bytes::Bytes;
use serde_json::{Map, Value};

pub use id::JobId;

use crate::error::Error;
use crate::routing::head::trim_ows;
use crate::store::{MessageStatus, Payload, Store};
use crate::tunnel::{Limit, Shutdown, TunnelId, Tunnels};

/// The Content-Type a worker replies with to report a failure.
pub const FAILURE_TYPE: &str = "application/problem+json";

/// Where a job stands.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// Queued, or taken by a worker.
    Processing,
    /// Done, with the worker's result (JSON if the reply was JSON, else a string).
    Done(Value),
    /// Done, with a result that is neither JSON nor UTF-8 text, in base64 (so no byte is lost).
    DoneBase64(String),
    /// The worker reported a failure.
    Failed(String),
}

/// A job as clients see it: its id, the fields it was triggered with, and its state.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The job's id.
    pub id: JobId,
    /// The fields of the object it was triggered with.
    pub fields: Map<String, Value>,
    /// Where it stands.
    pub state: JobState,
}

impl Job {
    fn new(id: &JobId, fields: Map<String, Value>, state: JobState) -> Job {
        Job {
            id: id.clone(),
            fields,
            state,
        }
    }

    /// `{"id", ...fields, "status", "result" | "error"}`, highway's shape.
    pub fn to_json(&self) -> Value {
        let mut object = Map::new();
        object.insert("id".into(), Value::String(self.id.to_string()));
        for (name, value) in &self.fields {
            if !matches!(
                name.as_str(),
                "id" | "status" | "result" | "result_encoding" | "error"
            ) {
                object.insert(name.clone(), value.clone());
            }
        }
        let status = match &self.state {
            JobState::Processing => "Processing",
            JobState::Done(_) | JobState::DoneBase64(_) => "Done",
            JobState::Failed(_) => "Failed",
        };
        object.insert("status".into(), status.into());
        match &self.state {
            JobState::Processing => {}
            JobState::Done(result) => {
                object.insert("result".into(), result.clone());
            }
            JobState::DoneBase64(result) => {
                object.insert("result".into(), result.clone().into());
                object.insert("result_encoding".into(), "base64".into());
            }
            JobState::Failed(error) => {
                object.insert("error".into(), error.clone().into());
            }
        }
        Value::Object(object)
    }
}

/// The jobs of one relay process.
#[derive(Clone)]
pub struct Jobs {
    tunnels: Tunnels,
    store: Store,
}

impl Jobs {
    /// Jobs queued in `tunnels`, with their records in `store`.
    pub fn new(tunnels: Tunnels, store: Store) -> Jobs {
        Jobs { tunnels, store }
    }

    /// Queues a job whose fields are `body`, a JSON object, with backpressure at `limit` as for a
    /// produce.
    pub async fn trigger(&self, queue: &TunnelId, body: Bytes, limit: Limit) -> Result<Job, Error> {
        let fields = match serde_json::from_slice::<Value>(&body) {
            Ok(Value::Object(fields)) => fields,
            Ok(_) => return Err(Error::InvalidBody("a job must be a JSON object".into())),
            Err(e) => {
                return Err(Error::InvalidBody(format!(
                    "a job must be a JSON object: {e}"
                )))
            }
        };
        let payload = Payload {
            body,
            content_type: Some("application/json".into()),
        };
        let msg = self.tunnels.produce_job(queue, payload, limit).await?;
        Ok(Job {
            id: JobId::new(queue.clone(), msg),
            fields,
            state: JobState::Processing,
        })
    }

    /// Waits up to `wait` until job `id` has finished, collecting nothing; whether it has.
    pub async fn await_finished(
        &self,
        id: &JobId,
        wait: Duration,
        shutdown: &mut Shutdown,
    ) -> Result<bool, Error> {
        let tunnels = &self.tunnels;
        tunnels
            .await_reply(id.queue(), id.msg(), wait, shutdown)
            .await
    }

    /// Whether job `id` may still finish: known (triggered, neither expired nor collected) and
    /// still in its queue.
    pub async fn unfinished(&self, id: &JobId) -> Result<bool, Error> {
        if self.store.job(id.queue(), id.msg()).await?.is_none() {
            return Ok(false);
        }
        let status = self.tunnels.status(id.queue(), id.msg()).await?;
        Ok(status != MessageStatus::Gone)
    }

    /// The job `id`, waiting up to `wait` for it to finish; `None` if it is unknown (never
    /// triggered, expired, or already collected). A finished job is handed out once: whoever
    /// collects it takes it, and gives it back with [`Jobs::give_back`] if it cannot deliver it.
    pub async fn collect(
        &self,
        id: &JobId,
        wait: Option<Duration>,
        shutdown: &mut Shutdown,
    ) -> Result<Option<Collected>, Error> {
        let Some(record) = self.store.job(id.queue(), id.msg()).await? else {
            return Ok(None);
        };
        let (queue, msg) = (id.queue(), id.msg());
        // Collected by another meanwhile (its reply and record go in one step), or its record
        // expired: there is nothing left to wait for, and the job is unknown now.
        let gone = AtomicBool::new(false);
        let recorded = || async {
            let there = self.store.job(queue, msg).await?.is_some();
            gone.store(!there, Ordering::Relaxed);
            Ok(there)
        };
        let tunnels = &self.tunnels;
        let first = tunnels
            .take_reply_while(queue, msg, wait, shutdown, recorded)
            .await?;
        if first.is_none() && gone.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let again = self.tunnels.take_reply(queue, msg, None, shutdown);
        // Taking the reply forgot the job in the same step: its final state is handed out once.
        let (state, reply) = match self.found(id, first, again).await? {
            Found::Reply(reply) => (outcome(&reply), Some(reply)),
            Found::Running => {
                let job = Job::new(id, fields(&record), JobState::Processing);
                return Ok(Some(Collected { job, taken: None }));
            }
            // Handed out once: by whoever forgets the record; to anyone else (another collector,
            // or one that took the result meanwhile) the job is unknown.
            Found::Left if self.store.forget_job(queue, msg).await? => {
                (JobState::Failed(LEFT_THE_QUEUE.into()), None)
            }
            Found::Left => return Ok(None),
        };
        let job = Job::new(id, fields(&record), state);
        let taken = Some(Taken { record, reply });
        Ok(Some(Collected { job, taken }))
    }

    /// Puts back the final state of a job that [`Jobs::collect`] took but could not deliver, for
    /// the next collector; it is then kept for `TUNNEL_REPLY_TTL`.
    pub async fn give_back(&self, collected: Collected) -> Result<(), Error> {
        let Some(Taken { record, reply }) = collected.taken else {
            return Ok(());
        };
        let id = &collected.job.id;
        let ttl = self.tunnels.config().reply_ttl;
        let store = &self.store;
        Ok(store
            .restore_job(id.queue(), id.msg(), record, reply, ttl)
            .await?)
    }

    /// What job `id`'s reply, read as `first`, says. Without one, a job whose message is gone
    /// from its queue was either replied just now (a reply removes the message in the same step:
    /// `again` reads once more) or removed without a result, never to finish.
    async fn found(
        &self,
        id: &JobId,
        first: Option<Payload>,
        again: impl std::future::Future<Output = Result<Option<Payload>, Error>>,
    ) -> Result<Found, Error> {
        if let Some(reply) = first {
            return Ok(Found::Reply(reply));
        }
        if self.tunnels.status(id.queue(), id.msg()).await? != MessageStatus::Gone {
            return Ok(Found::Running);
        }
        Ok(again.await?.map_or(Found::Left, Found::Reply))
    }
}

/// A job as [`Jobs::collect`] found it, with the final state it took, if any.
pub struct Collected {
    /// The job as its client sees it.
    pub job: Job,
    taken: Option<Taken>,
}

impl Collected {
    /// Whether it hands out the job's final state, which nobody collects again.
    pub fn hands_out(&self) -> bool {
        self.taken.is_some()
    }
}

/// What the store held for a job's final state, to put back if it is not delivered.
struct Taken {
    record: Bytes,
    reply: Option<Payload>,
}

/// The fields of the object a job was triggered with, from its record.
fn fields(record: &[u8]) -> Map<String, Value> {
    match serde_json::from_slice::<Value>(record) {
        Ok(Value::Object(fields)) => fields,
        _ => Map::new(),
    }
}

/// What a job's reply, or its absence, says.
enum Found {
    /// The worker's reply.
    Reply(Payload),
    /// None yet, the job still queued or taken.
    Running,
    /// None, and the job's message left its queue: it will never finish.
    Left,
}

/// Why a job without a result whose message is gone failed.
const LEFT_THE_QUEUE: &str = concat!(
    "the job left its queue without a result (queue cleared or trimmed, taken without pending, ",
    "or acknowledged without a reply)"
);

/// What a worker's reply says: a failure report, a JSON result, text, or bytes.
fn outcome(reply: &Payload) -> JobState {
    let content_type = reply.content_type.as_deref().unwrap_or("");
    // HTTP's whitespace only, as the tunnels keep a type: a Unicode space is part of it.
    let media_type = trim_ows(content_type.split(';').next().unwrap_or("")).to_ascii_lowercase();
    let text = || String::from_utf8_lossy(&reply.body).into_owned();
    if media_type == FAILURE_TYPE {
        // A detail that is not UTF-8 is still the detail, with U+FFFD in place of its bytes.
        let problem = serde_json::from_str::<Value>(&String::from_utf8_lossy(&reply.body)).ok();
        let said = |field: &str| {
            let value = problem.as_ref()?.get(field)?.as_str()?;
            Some(value.to_owned()).filter(|value| !value.is_empty())
        };
        let error = said("detail")
            .or_else(|| said("title"))
            .unwrap_or_else(text);
        if error.is_empty() {
            return JobState::Failed("the worker reported a failure without saying why".into());
        }
        return JobState::Failed(error);
    }
    if media_type == "application/json" || media_type.ends_with("+json") {
        if let Ok(result) = serde_json::from_slice(&reply.body) {
            return JobState::Done(result);
        }
    }
    match std::str::from_utf8(&reply.body) {
        Ok(text) => JobState::Done(Value::String(text.to_owned())),
        Err(_) => JobState::DoneBase64(BASE64_STANDARD.encode(&reply.body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reply(content_type: Option<&str>, body: &str) -> Payload {
        Payload {
            body: Bytes::from(body.to_owned()),
            content_type: content_type.map(String::from),
        }
    }

    /// JSON replies become JSON results, anything else a string, problem+json a failure.
    #[test]
    fn outcomes() {
        let json_reply = reply(Some("application/json; charset=utf-8"), r#"{"n":1}"#);
        assert_eq!(outcome(&json_reply), JobState::Done(json!({"n": 1})));
        let text = reply(Some("text/plain"), "hello");
        assert_eq!(outcome(&text), JobState::Done(json!("hello")));
        assert_eq!(outcome(&reply(None, "x")), JobState::Done(json!("x")));
        let bad_json = reply(Some("application/json"), "not json");
        assert_eq!(outcome(&bad_json), JobState::Done(json!("not json")));
        let problem = reply(
            Some(FAILURE_TYPE),
            r#"{"title":"job failed","detail":"boom"}"#,
        );
        assert_eq!(outcome(&problem), JobState::Failed("boom".into()));
        // A detail that is no text, or empty, gives way to the title.
        let titled = reply(Some(FAILURE_TYPE), r#"{"title":"t","detail":null}"#);
        assert_eq!(outcome(&titled), JobState::Failed("t".into()));
        let titled = reply(Some(FAILURE_TYPE), r#"{"title":"t","detail":""}"#);
        assert_eq!(outcome(&titled), JobState::Failed("t".into()));
        let silent = reply(Some(FAILURE_TYPE), "");
        assert_eq!(
            outcome(&silent),
            JobState::Failed("the worker reported a failure without saying why".into())
        );
        let bare = reply(Some(FAILURE_TYPE), "plain words");
        assert_eq!(outcome(&bare), JobState::Failed("plain words".into()));
        let not_utf8 = Payload {
            body: Bytes::from_static(b"{\"title\":\"t\",\"detail\":\"boom \xff\"}"),
            content_type: Some(FAILURE_TYPE.into()),
        };
        assert_eq!(outcome(&not_utf8), JobState::Failed("boom \u{FFFD}".into()));
        // A Unicode space makes another type, as the tunnels keep it.
        let spaced = reply(Some("\u{a0}application/json"), r#"{"n":1}"#);
        assert_eq!(outcome(&spaced), JobState::Done(json!(r#"{"n":1}"#)));
        // Bytes that are not UTF-8 come back whole, in base64, and say so.
        let binary = Payload {
            body: Bytes::from_static(b"\x89PNG\xff"),
            content_type: Some("application/octet-stream".into()),
        };
        assert_eq!(outcome(&binary), JobState::DoneBase64("iVBOR/8=".into()));
        let fields = Map::from_iter([("result_encoding".to_owned(), json!("mine"))]);
        let job = Job::new(&"q.1-0".parse().unwrap(), fields, outcome(&binary));
        assert_eq!(
            job.to_json(),
            json!({
                "id": "q.1-0",
                "status": "Done",
                "result": "iVBOR/8=",
                "result_encoding": "base64"
            })
        );
    }

    /// A job that left its queue without a result is handed out once, as failed; given back
    /// (its socket could not deliver it), it is handed out again, the same, once.
    #[tokio::test]
    async fn a_job_that_left_its_queue_is_given_back() {
        let config = crate::config::Config::from_lookup(|_| None).expect("the defaults are valid");
        let store = Store::open(&config.store)
            .await
            .expect("the memory store opens");
        let jobs = Jobs::new(Tunnels::new(store.clone(), config.tunnel), store);
        let queue = TunnelId::parse("jobs").expect("a valid id");
        let job = jobs
            .trigger(&queue, Bytes::from("{}"), Limit::Default)
            .await
            .expect("queued");
        jobs.tunnels.clear(&queue).await.expect("cleared");
        let failed = Job {
            state: JobState::Failed(LEFT_THE_QUEUE.into()),
            ..job.clone()
        };

        let taken = collect(&jobs, &job.id).await.expect("known");
        assert_eq!(taken.job, failed);
        assert!(collect(&jobs, &job.id).await.is_none(), "handed out twice");
        jobs.give_back(taken).await.expect("given back");
        let again = collect(&jobs, &job.id).await.expect("known again");
        assert_eq!(again.job, failed);
        assert!(collect(&jobs, &job.id).await.is_none(), "handed out twice");
    }

    async fn collect(jobs: &Jobs, id: &JobId) -> Option<Collected> {
        let (_stop, mut shutdown) = tokio::sync::watch::channel(false);
        jobs.collect(id, None, &mut shutdown)
            .await
            .expect("collected")
    }

    /// The JSON shape echoes the fields, with Burrow's own keys winning.
    #[test]
    fn json_shape() {
        let id: JobId = "jobs.17-0".parse().unwrap();
        let fields = json!({"text": "hi", "status": "mine", "id": "x"});
        let Value::Object(fields) = fields else {
            unreachable!()
        };
        let job = Job {
            id,
            fields,
            state: JobState::Done(json!(42)),
        };
        assert_eq!(
            job.to_json(),
            json!({"id": "jobs.17-0", "text": "hi", "status": "Done", "result": 42})
        );
        let keys: Vec<_> = job.to_json().as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["id", "text", "status", "result"]);
    }
}
