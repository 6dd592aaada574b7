//! Group commit for produces and consumes: while one call of such a script from a relay thread is
//! at the server, the operations of that kind issued on that thread queue up, and the next call
//! carries them all.
//!
//! fred writes (flushes) every script call to the socket on its own, so each operation cost one
//! write(2) in the relay and one read in redis-server, on two cores shared with the load. An
//! operation that finds no call in flight goes out at once, alone: batching only ever replaces
//! waiting in the socket with waiting in the queue. Each operation is still one atomic step of the
//! script, and a failing one fails alone (the scripts answer `{'error', why}` for it).

use std::cell::RefCell;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use fred::prelude::Value;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::sync::oneshot;

use super::clients::Clients;
use super::{unexpected, Call, Script, StoreError, QUEUE_TIMEOUT};

/// The most operations one call carries.
const MAX_OPERATIONS: usize = 64;

/// A call stops taking operations once their arguments add up to this many bytes.
const MAX_BYTES: usize = 1024 * 1024;

thread_local! {
    /// This thread's queue for each store and script used from it (tests open many stores).
    static QUEUES: RefCell<Vec<(Owner, Arc<Mutex<Queue>>)>> = const { RefCell::new(Vec::new()) };
}

/// A queue's store and script.
type Owner = (u64, &'static str);

/// A script that runs any number of one-key operations in one call: `KEYS[i]` and the `arity`
/// arguments from `ARGV[arity × (i - 1) + 1]` are operation `i`, and the reply is the list of
/// their replies, in order.
pub(super) struct Batched {
    /// The script, taking N operations.
    pub script: Script,
    /// Arguments per operation.
    pub arity: usize,
    /// What the script does, for errors.
    pub name: &'static str,
}

/// One operation: its key, its arguments (`arity` of them) and their size in bytes.
pub(super) struct Operation {
    /// The tunnel's stream key.
    pub key: String,
    /// `arity` arguments.
    pub args: Vec<Value>,
    /// Their size, which bounds a call's size.
    pub bytes: usize,
}

struct Queued {
    /// Tells the operation apart in its queue.
    id: u64,
    operation: Operation,
    /// When the operation gives up waiting to be sent, counted from when it was asked for.
    deadline: Instant,
    reply: oneshot::Sender<Result<Value, StoreError>>,
}

#[derive(Default)]
struct Queue {
    waiting: Vec<Queued>,
    /// A call (and the task that sends the next ones) is running.
    sending: bool,
    /// The id of the next operation queued.
    next_id: u64,
}

/// Runs `operation` with `batched`, in one call with the others of this thread; answers the
/// script's reply for this one operation.
pub(super) async fn run(
    clients: &Arc<Clients>,
    batched: &'static Batched,
    operation: Operation,
) -> Result<Value, StoreError> {
    let deadline = Instant::now() + QUEUE_TIMEOUT;
    let Some(queue) = local_queue((clients.id(), batched.name)) else {
        // On a multi-threaded runtime nothing ties a queue to a connection: one call each.
        let mut replies = send(clients, batched, vec![operation]).await?;
        return replies.pop().unwrap_or_else(|| Err(no_reply(batched)));
    };
    let (reply, mut answer) = oneshot::channel();
    let (id, start) = {
        let mut queue = lock(&queue);
        let id = queue.next_id;
        queue.next_id += 1;
        queue.waiting.push(Queued {
            id,
            operation,
            deadline,
            reply,
        });
        (id, !std::mem::replace(&mut queue.sending, true))
    };
    if start {
        // A current-thread runtime: the task stays on this thread, with its connection.
        tokio::spawn(drain(queue.clone(), clients.clone(), batched));
    }
    let stopped = |_| {
        Err(StoreError::Unavailable(
            "the relay stopped before the store answered".into(),
        ))
    };
    let until = tokio::time::Instant::from_std(deadline);
    if let Ok(answered) = tokio::time::timeout_at(until, &mut answer).await {
        return answered.unwrap_or_else(stopped);
    }
    // Still queued behind a call at the server: it leaves, having done nothing. Already sent:
    // only its answer can say what it did.
    let left = {
        let mut queue = lock(&queue);
        let queued = queue.waiting.len();
        queue.waiting.retain(|waiting| waiting.id != id);
        queue.waiting.len() < queued
    };
    if left {
        return Err(StoreError::Unavailable(
            "redis did not answer in time".into(),
        ));
    }
    answer.await.unwrap_or_else(stopped)
}

/// Sends what is queued, a call at a time, until the queue is empty.
async fn drain(queue: Arc<Mutex<Queue>>, clients: Arc<Clients>, batched: &'static Batched) {
    let queue = Sending(queue);
    loop {
        let batch = {
            let mut queue = lock(&queue.0);
            if queue.waiting.is_empty() {
                return;
            }
            take_batch(&mut queue.waiting)
        };
        // Operations that waited past their own deadline are not sent late.
        let now = Instant::now();
        let (late, batch): (Vec<_>, Vec<_>) = batch.into_iter().partition(|q| q.deadline <= now);
        for queued in late {
            let _ = queued.reply.send(Err(StoreError::Unavailable(
                "redis did not answer in time".into(),
            )));
        }
        if batch.is_empty() {
            continue;
        }
        let (operations, replies): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|q| (q.operation, q.reply)).unzip();
        match send(&clients, batched, operations).await {
            Ok(results) => {
                for (reply, result) in replies.into_iter().zip(results) {
                    let _ = reply.send(result);
                }
            }
            Err(err) => {
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

/// The queue of a running [`drain`]. However the task ends, even cancelled with its runtime, the
/// next operation starts a new one, and none is left waiting for an answer that cannot come.
struct Sending(Arc<Mutex<Queue>>);

impl Drop for Sending {
    fn drop(&mut self) {
        let mut queue = lock(&self.0);
        queue.sending = false;
        for queued in queue.waiting.drain(..) {
            let _ = queued.reply.send(Err(StoreError::Unavailable(
                "the store's call ended before this operation was sent".into(),
            )));
        }
    }
}

/// The oldest queued operations, within [`MAX_OPERATIONS`] and [`MAX_BYTES`] (at least one).
fn take_batch(waiting: &mut Vec<Queued>) -> Vec<Queued> {
    let mut bytes = 0;
    let count = waiting
        .iter()
        .take(MAX_OPERATIONS)
        .take_while(|queued| {
            bytes += queued.operation.bytes;
            bytes <= MAX_BYTES
        })
        .count()
        .max(1);
    waiting.drain(..count).collect()
}

/// One script call for `operations`; one result per operation, in order.
async fn send(
    clients: &Clients,
    batched: &Batched,
    operations: Vec<Operation>,
) -> Result<Vec<Result<Value, StoreError>>, StoreError> {
    let count = operations.len();
    let mut keys = Vec::with_capacity(count);
    let mut args = Vec::with_capacity(count * batched.arity);
    for operation in operations {
        keys.push(operation.key);
        args.extend(operation.args);
    }
    let call = Call::new(clients);
    match batched.script.run(&call, keys, args).await? {
        Value::Array(replies) if replies.len() == count => Ok(replies
            .into_iter()
            .map(|reply| failed(batched, reply))
            .collect()),
        other => Err(unexpected(batched.name, &other)),
    }
}

/// An operation's reply, or the error the script caught for it: `{'error', why}`.
fn failed(batched: &Batched, reply: Value) -> Result<Value, StoreError> {
    if let Value::Array(parts) = &reply {
        if let [tag, why] = parts.as_slice() {
            if tag.as_str().as_deref() == Some("error") {
                let why = why.as_str().map(|why| why.to_string()).unwrap_or_default();
                let error = format!("redis {}: {why}", batched.name);
                return Err(match super::is_transient(&why) {
                    true => StoreError::Unavailable(error),
                    false => StoreError::Internal(error),
                });
            }
        }
    }
    Ok(reply)
}

fn no_reply(batched: &Batched) -> StoreError {
    StoreError::Internal(format!("the {} script answered nothing", batched.name))
}

/// This thread's queue for `owner`; none unless on a current-thread runtime.
fn local_queue(owner: Owner) -> Option<Arc<Mutex<Queue>>> {
    let flavor = Handle::try_current().ok()?.runtime_flavor();
    if flavor != RuntimeFlavor::CurrentThread {
        return None;
    }
    QUEUES.with(|queues| {
        let mut queues = queues.borrow_mut();
        if let Some((_, queue)) = queues.iter().find(|(other, _)| *other == owner) {
            return Some(queue.clone());
        }
        let queue = Arc::new(Mutex::new(Queue::default()));
        queues.push((owner, queue.clone()));
        Some(queue)
    })
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // Poisoning only means a panic mid-push or mid-take; the queue itself is still sound.
    queue.lock().unwrap_or_else(|e| e.into_inner())
}
