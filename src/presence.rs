//! Presence (PROTOCOL.md part 3, askr's connected state): which agents are connected to which
//! relay instance. Every instance announces its address and its agents in the store a few times
//! per expiry period, so an instance that vanished leaves the list by itself, and an agent that
//! vanished leaves its instance's list once its heartbeats stop. `GET /agents` lists every
//! instance's agents, and a request for an agent connected elsewhere is sent to that instance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::metrics::{self, StoreOp};
use crate::routing::{Agents, RETURN_WITHIN};
use crate::store::{Store, StoreError};

/// How often an instance announces itself.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);

/// How soon a failed announcement is tried again.
pub const ANNOUNCE_RETRY: Duration = Duration::from_millis(500);

/// How long an announcement lasts: three missed announcements and the instance is gone.
const ANNOUNCEMENT_TTL: Duration = Duration::from_secs(15);

/// How long an instance that could not be reached (or that refused a name) is tried after the
/// others; then one request tries it again, while the others keep it last for as long again.
const UNREACHABLE_FOR: Duration = Duration::from_secs(5);

/// How long a request waits for a read of the store before it makes do with the last one.
const STORE_PATIENCE: Duration = Duration::from_millis(500);

/// How long after a read failed (or outlasted [`STORE_PATIENCE`]) requests make do with the last
/// read without asking the store.
const STORE_RESPITE: Duration = Duration::from_secs(1);

/// How long an instance that could not be reached, and was not tried since, is remembered as such.
const FORGET_UNREACHABLE: Duration = Duration::from_secs(60);

/// How long after this instance started a record at its own address under another id is taken
/// for its predecessor's (restarted in place): such a record expires within a record's lifetime
/// of the start (plus slack for the clocks that write and read expiry times). One still there
/// later is a live instance given the same address, by mistake.
const PREDECESSOR_WITHIN: Duration = Duration::from_secs(20);

/// How long a name listed by a read of the store is remembered: past that, a record that lists it
/// as departed counts as its first listing (see [`Presence::listed_lately`]). Longer than a name
/// stays in such lists: up to [`RETURN_WITHIN`] in a record, and a record's lifetime after that.
const FORGET_LISTED: Duration = Duration::from_secs(60);

/// How long a read of where the other instances' agents are answers later requests for the names
/// it found. A read parses every instance's record, which with many agents costs milliseconds
/// and a round trip to the store per request; a name it did not find is looked up afresh.
const REMEMBER_HOLDERS: Duration = Duration::from_secs(1);

/// This instance's presence, and the view of everyone's.
#[derive(Clone)]
pub struct Presence {
    store: Store,
    agents: Agents,
    instance: String,
    address: String,
    /// The last read of the other instances' agents.
    directory: Arc<Mutex<Option<Directory>>>,
    /// When reads of the store last listed each name's agent at another instance or at a
    /// predecessor, leaving or not, or first listed it as departed (see
    /// [`Presence::listed_lately`]); kept for [`FORGET_LISTED`].
    listed: Arc<Mutex<HashMap<String, Instant>>>,
    /// Held while reading for [`Presence::holders`]: requests that need a read meanwhile wait
    /// for the next one instead of each reading every record.
    reading: Arc<tokio::sync::Mutex<()>>,
    /// Instances tried last until a time: by address those that could not be reached, by
    /// `address/name` those that refused a name (a record older than the agent's leaving).
    tried_last: Arc<Mutex<HashMap<String, Instant>>>,
    /// Until when the store is left alone after a read failed.
    respite: Arc<Mutex<Option<Instant>>>,
    /// When this instance started, to tell a predecessor at its address from a live instance.
    started: Instant,
    /// The same in Unix milliseconds, in its record: of the records at one address, other
    /// instances take the latest started's (the one that has the address now).
    started_ms: u64,
    /// Whether another live instance announcing this one's address was logged.
    warned_shared_address: Arc<AtomicBool>,
    /// Until when this process, the new one of a graceful upgrade, says in its record that it is
    /// taking over from its predecessor: the names in that one's record are on their way here.
    taking_over_until: Option<Instant>,
}

/// Which other instances had which agents, by name, when the store was read.
struct Directory {
    read_at: Instant,
    holders: HashMap<String, Vec<Holder>>,
}

/// An instance with agents of a name.
#[derive(Clone)]
struct Holder {
    address: String,
    /// Whether every one of them is silent (frozen or cut off): such an instance is tried last.
    silent: bool,
    /// Whether they are only on their way there: listed by the predecessor of an instance taking
    /// over in a graceful upgrade. Such an instance is tried after those that have the name.
    moving: bool,
}

/// The part of an instance's record that says where its agents are.
#[derive(Deserialize)]
struct Record {
    instance: String,
    address: String,
    /// When the instance started, in Unix milliseconds (0 in records of older versions).
    #[serde(default)]
    started_ms: u64,
    /// Whether it is the new process of a graceful upgrade, taking over from its predecessor.
    #[serde(default)]
    taking_over: bool,
    #[serde(default)]
    agents: Vec<Named>,
    /// The names of the agents it had as it stopped (see [`Presence::withdraw`]), or that left it
    /// lately.
    #[serde(default)]
    departed: Vec<String>,
    /// The names of the agents connected to it as it stopped, told to go: on their way to its
    /// successor, if one is taking over at its address.
    #[serde(default)]
    moving: Vec<String>,
}

/// An agent in a record, by name and state (the rest is for `GET /agents`).
#[derive(Deserialize)]
struct Named {
    name: String,
    #[serde(default)]
    silent: bool,
    /// Leaving (it or its relay said GOAWAY): it takes no new requests.
    #[serde(default)]
    draining: bool,
}

impl Presence {
    /// The presence of this instance, reachable by other instances at `address` (`host:port`);
    /// until `taking_over_until`, that of the new process of a graceful upgrade, to which its
    /// predecessor's agents are moving.
    pub fn new(
        store: Store,
        agents: Agents,
        address: String,
        taking_over_until: Option<Instant>,
    ) -> Presence {
        let instance = format!("{:016x}", fastrand::u64(..));
        Presence {
            store,
            agents,
            instance,
            address,
            directory: Arc::default(),
            listed: Arc::default(),
            reading: Arc::default(),
            tried_last: Arc::default(),
            respite: Arc::default(),
            started: Instant::now(),
            started_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_millis() as u64),
            warned_shared_address: Arc::default(),
            taking_over_until,
        }
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Where other instances reach this one (`BURROW_ADVERTISE`).
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Records this instance's address and agents in the store, and the names whose agents left
    /// lately: another instance that reads them waits for those agents to come back, as this one
    /// does, even if it had not read the store while they were here.
    pub async fn announce(&self) -> Result<(), StoreError> {
        let departed = self.agents.departed_lately();
        self.record(self.local_agents(), departed, Vec::new()).await
    }

    /// Records this instance with no agents, as it stops: other instances stop sending it
    /// requests at once instead of when its record expires. The names it had stay in the record
    /// apart, for its successor and the other instances to wait for those agents to come back;
    /// those connected now apart again, for a successor taking over at this address.
    pub async fn withdraw(&self) -> Result<(), StoreError> {
        let moving = self.agents.connected();
        self.record(Vec::new(), self.agents.names_lately(), moving)
            .await
    }

    /// Resolves when an agent connects here or leaves, falls silent, speaks again or begins to
    /// drain, which is worth announcing at once.
    pub async fn agents_changed(&self) {
        self.agents.changed().await;
    }

    /// Resolves when the store is back after an outage, which may have lost the records.
    pub async fn store_back(&self) {
        self.store.back().await;
    }

    async fn record(
        &self,
        agents: Vec<Value>,
        departed: Vec<String>,
        moving: Vec<String>,
    ) -> Result<(), StoreError> {
        let record = json!({
            "instance": self.instance,
            "address": self.address,
            "started_ms": self.started_ms,
            "taking_over": self.taking_over_until.is_some_and(|until| Instant::now() < until),
            "agents": agents,
            "departed": departed,
            "moving": moving,
        });
        let record = Bytes::from(record.to_string());
        self.store
            .announce(&self.instance, record, ANNOUNCEMENT_TTL)
            .await
    }

    /// Every instance's agents, each with its `instance`; this instance's are always current.
    pub async fn all(&self) -> Result<Vec<Value>, StoreError> {
        let records = self.read().await?;
        let mut agents = self.local_agents();
        let others: Vec<Value> = records
            .iter()
            .filter_map(|record| serde_json::from_slice::<Value>(record).ok())
            .filter(|record| {
                let instance = record["instance"].as_str().unwrap_or_default();
                let address = record["address"].as_str().unwrap_or_default();
                self.is_other(
                    instance,
                    address,
                    record["started_ms"].as_u64().unwrap_or(0),
                )
            })
            .collect();
        let address = |record: &Value| record["address"].as_str().unwrap_or_default().to_owned();
        let started = |record: &Value| record["started_ms"].as_u64().unwrap_or(0);
        let taking_over = |record: &Value| record["taking_over"].as_bool().unwrap_or(false);
        for (record, _) in current_at_each_address(others, address, started, taking_over) {
            if let Some(Value::Array(theirs)) = record.get("agents") {
                agents.extend(theirs.iter().cloned());
            }
        }
        Ok(agents)
    }

    /// Whether a read of the store within [`RETURN_WITHIN`] listed an agent named `name` at
    /// another instance or at a predecessor (restarted in place), even one leaving, or first
    /// listed it as departed: a request that finds none may wait for one to come back. (Later
    /// reads that list it as departed do not count: records name departed agents for a while,
    /// and a stopped instance's for as long as its record lives.)
    pub fn listed_lately(&self, name: &str) -> bool {
        let listed = lock(&self.listed);
        listed
            .get(name)
            .is_some_and(|at| at.elapsed() < RETURN_WITHIN)
    }

    /// The addresses of the other instances that had an agent named `name` at a read of the
    /// store less than a second ago, in the order to try them (see [`Presence::holders`]);
    /// `None` if there was no such read.
    pub fn remembered_holders(&self, name: &str) -> Option<Vec<String>> {
        Some(self.in_order(name, &self.remembered(name)?))
    }

    /// The addresses of the other instances with an agent named `name` that is not silent (nor
    /// only on its way there), as remembered or else read now, in the order to try them.
    pub async fn answering_holders(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let holders = match self.remembered(name) {
            Some(holders) => holders,
            None => self.read_holders(name).await?,
        };
        let answering = holders.into_iter().filter(|h| !h.silent && !h.moving);
        let answering: Vec<Holder> = answering.collect();
        Ok(self.in_order(name, &answering))
    }

    /// The instances with an agent named `name` at a read less than a second ago.
    fn remembered(&self, name: &str) -> Option<Vec<Holder>> {
        let directory = self.directory();
        let directory = directory.as_ref()?;
        if directory.read_at.elapsed() >= REMEMBER_HOLDERS {
            return None;
        }
        directory.holders.get(name).cloned()
    }

    /// The addresses of the other instances with an agent named `name`, from a read of the store
    /// begun after this call: in random order so that instances sharing a name share its
    /// requests, but those that could not be reached lately last, and before them those whose
    /// agents of the name are all silent. One read serves every request waiting for it.
    pub async fn holders(&self, name: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.in_order(name, &self.read_holders(name).await?))
    }

    /// The instances with an agent named `name`, from a read begun after this call (one read
    /// serves every call waiting for it). While the store fails or is slow to answer (over
    /// [`STORE_PATIENCE`]), from the last read within a record's lifetime, if there is one:
    /// records live that long anyway, and an instance gone meanwhile is passed over as any;
    /// without one, `Unavailable`. A failed read leaves the store alone for [`STORE_RESPITE`].
    async fn read_holders(&self, name: &str) -> Result<Vec<Holder>, StoreError> {
        let asked_at = Instant::now();
        let read = async {
            let _turn = self.reading.lock().await;
            let fresh = self
                .directory()
                .as_ref()
                .is_some_and(|d| d.read_at >= asked_at);
            if !fresh {
                self.read().await?;
            }
            Ok(self.listed(name))
        };
        let known = self
            .directory()
            .as_ref()
            .filter(|d| d.read_at.elapsed() < ANNOUNCEMENT_TTL)
            .map(|d| d.holders.get(name).cloned().unwrap_or_default());
        let unknown = || {
            let why = "the store did not answer in time, and no read of it is recent enough";
            StoreError::Unavailable(why.into())
        };
        let resting = lock(&self.respite).is_some_and(|until| until > Instant::now());
        if resting {
            return known.ok_or_else(unknown);
        }
        match tokio::time::timeout(STORE_PATIENCE, read).await {
            Ok(Ok(holders)) => Ok(holders),
            Ok(Err(err)) => {
                *lock(&self.respite) = Some(Instant::now() + STORE_RESPITE);
                known.ok_or(err)
            }
            Err(_) => {
                *lock(&self.respite) = Some(Instant::now() + STORE_RESPITE);
                known.ok_or_else(unknown)
            }
        }
    }

    /// The instances with an agent named `name` at the last read.
    fn listed(&self, name: &str) -> Vec<Holder> {
        let directory = self.directory();
        let holders = directory.as_ref().and_then(|d| d.holders.get(name));
        holders.cloned().unwrap_or_default()
    }

    /// Notes that the instance at `address` could not be reached: for a few seconds it is tried
    /// after the others. Whether it was not noted already (a failure worth a log line: the
    /// first of an outage).
    pub fn unreachable(&self, address: &str) -> bool {
        self.try_last(address.to_owned())
    }

    /// Notes that the instance at `address` said it has no agent named `name` (its record is
    /// older than the agent's leaving): for a few seconds it is tried last for that name.
    pub fn refused(&self, address: &str, name: &str) {
        self.try_last(format!("{address}/{name}"));
    }

    /// Marks `key` tried last; whether it was not marked already.
    fn try_last(&self, key: String) -> bool {
        let now = Instant::now();
        let mut tried_last = lock(&self.tried_last);
        tried_last.retain(|_, until| *until + FORGET_UNREACHABLE > now);
        tried_last.insert(key, now + UNREACHABLE_FOR).is_none()
    }

    /// Notes that the instance at `address` answered.
    pub fn reached(&self, address: &str) {
        lock(&self.tried_last).remove(address);
    }

    /// The addresses of `holders` in the order to try them (see [`Presence::holders`]). An
    /// unreachable instance whose time is served is tried in its turn by this request alone:
    /// the others keep it last meanwhile, so that they do not all wait on it at once again.
    fn in_order(&self, name: &str, holders: &[Holder]) -> Vec<String> {
        let now = Instant::now();
        let mut tried_last = lock(&self.tried_last);
        let mut last = |key: &str| match tried_last.get_mut(key) {
            Some(until) if *until > now => true,
            Some(until) => {
                *until = now + UNREACHABLE_FOR;
                false
            }
            None => false,
        };
        let mut holders: Vec<(bool, &Holder)> = holders
            .iter()
            .map(|holder| {
                let refused = last(&format!("{}/{name}", holder.address));
                (last(&holder.address) || refused, holder)
            })
            .collect();
        fastrand::shuffle(&mut holders);
        holders.sort_by_key(|(last, holder)| (*last, holder.silent, holder.moving));
        holders
            .into_iter()
            .map(|(_, holder)| holder.address.clone())
            .collect()
    }

    /// Reads every instance's record, and notes which other instances have which agents.
    async fn read(&self) -> Result<Vec<Bytes>, StoreError> {
        let read_at = Instant::now();
        let records = metrics::store_op(StoreOp::Instances, self.store.instances()).await?;
        let mut holders: HashMap<String, Vec<Holder>> = HashMap::new();
        let parsed: Vec<Record> = records
            .iter()
            .filter_map(|record| serde_json::from_slice::<Record>(record).ok())
            .filter(|record| record.instance != self.instance)
            .collect();
        // A predecessor's agents (at this address, or another's) are likely to connect again.
        let mut listed = lock(&self.listed);
        listed.retain(|_, at| at.elapsed() < FORGET_LISTED);
        for record in &parsed {
            for agent in &record.agents {
                let at = listed.entry(agent.name.clone()).or_insert(read_at);
                *at = (*at).max(read_at);
            }
            for name in record.departed.iter().chain(&record.moving) {
                listed.entry(name.clone()).or_insert(read_at);
            }
        }
        drop(listed);
        let others = parsed
            .into_iter()
            .filter(|record| self.is_other(&record.instance, &record.address, record.started_ms))
            .collect();
        let address = |record: &Record| record.address.clone();
        let current = current_at_each_address(
            others,
            address,
            |record| record.started_ms,
            |record| record.taking_over,
        );
        for (record, moving) in current {
            // A predecessor's agents, leaving or not, and those it had as it stopped, are on their
            // way to the process at its address, which waits for them. (Not those that left it
            // before: they may be gone for good.)
            let agents = record.agents.into_iter();
            let staying = agents.filter(|agent| moving || !agent.draining);
            let told_to_go = record.moving.into_iter().filter(|_| moving);
            let named = staying
                .map(|agent| (agent.name, agent.silent))
                .chain(told_to_go.map(|name| (name, false)));
            for (name, silent) in named {
                let of_name = holders.entry(name).or_default();
                match of_name.iter_mut().find(|h| h.address == record.address) {
                    Some(holder) => {
                        holder.silent &= silent;
                        holder.moving &= moving;
                    }
                    None => of_name.push(Holder {
                        address: record.address.clone(),
                        silent,
                        moving,
                    }),
                }
            }
        }
        let mut directory = self.directory();
        // `GET /agents` reads too, alongside: a slower, older read does not replace a newer.
        if directory.as_ref().is_none_or(|d| d.read_at < read_at) {
            *directory = Some(Directory { read_at, holders });
        }
        Ok(records)
    }

    /// Whether a record of `instance` at `address`, started at `started_ms`, is another live
    /// instance's: not this one's, nor one left by a predecessor at this one's address (restarted
    /// in place, say after a crash), whose agents are gone or connected here now, and whose
    /// address leads here. A successor at this address (restarted in place, or upgraded) is
    /// another: this instance, stopping, no longer takes the connections made to it there. Past
    /// [`PREDECESSOR_WITHIN`], an older id at this address is a live instance given the same
    /// `BURROW_ADVERTISE` by mistake: taken as another instance, as before, and logged once.
    fn is_other(&self, instance: &str, address: &str, started_ms: u64) -> bool {
        if instance == self.instance {
            return false;
        }
        if address != self.address || started_ms > self.started_ms {
            return true;
        }
        if self.started.elapsed() < PREDECESSOR_WITHIN {
            return false;
        }
        if !self.warned_shared_address.swap(true, Ordering::Relaxed) {
            log::warn!(
                "another relay instance ({instance}) announces this instance's address {address}: \
                 give each instance its own BURROW_ADVERTISE, or requests sent on to it may come \
                 back here"
            );
        }
        true
    }

    fn directory(&self) -> MutexGuard<'_, Option<Directory>> {
        lock(&self.directory)
    }

    fn local_agents(&self) -> Vec<Value> {
        self.agents
            .names()
            .into_iter()
            .map(|a| {
                json!({
                    "name": a.name,
                    "instance": self.instance,
                    "connected_since_ms": a.connected_since_ms,
                    "last_heartbeat_ms": a.last_heartbeat_ms,
                    "requests_in_flight": a.in_flight,
                    "silent": a.silent,
                    "draining": a.draining,
                })
            })
            .collect()
    }
}

/// Locks `mutex`; a panic elsewhere while it was held left nothing half-done worth refusing.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Of `records`, those that say where agents are: at each address, those of the instance that
/// started last, which holds the address now (an instance restarted in place, or upgraded: its
/// predecessor's record, until it expires, lists agents that are gone); and, while that instance
/// is `taking_over` from its predecessor in a graceful upgrade, the older ones too, marked `true`:
/// their agents are moving to it.
fn current_at_each_address<T>(
    records: Vec<T>,
    address: impl Fn(&T) -> String,
    started_ms: impl Fn(&T) -> u64,
    taking_over: impl Fn(&T) -> bool,
) -> Vec<(T, bool)> {
    let mut latest: HashMap<String, (u64, bool)> = HashMap::new();
    for record in &records {
        let newest = latest.entry(address(record)).or_default();
        if started_ms(record) >= newest.0 {
            *newest = (started_ms(record), taking_over(record));
        }
    }
    records
        .into_iter()
        .filter_map(|record| {
            let (newest, taking_over) = latest.get(&address(&record)).copied()?;
            let predecessor = started_ms(&record) < newest;
            (!predecessor || taking_over).then_some((record, predecessor))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreConfig;

    /// The presence of an instance at `address`, on a memory store of its own.
    async fn at(address: &str) -> Presence {
        let store = Store::open(&StoreConfig::Memory)
            .await
            .expect("a memory store");
        Presence::new(store, Agents::new(), address.into(), None)
    }

    /// An instance that could not be reached comes after the others (silent ones included) and
    /// is logged once; when its time is served, one request tries it in its turn while the others
    /// keep it last; once it answers, it takes its turn again.
    #[tokio::test]
    async fn unreachable_instances_come_last_and_one_request_tries_again() {
        let presence = at("127.0.0.1:1").await;
        let holder = |address: &str, silent| Holder {
            address: address.into(),
            silent,
            moving: false,
        };
        let holders = [holder("dead:1", false), holder("frozen:1", true)];
        assert!(presence.unreachable("dead:1"));
        assert!(!presence.unreachable("dead:1"));
        for _ in 0..10 {
            assert_eq!(presence.in_order("svc", &holders), ["frozen:1", "dead:1"]);
        }
        let served = Instant::now() - Duration::from_millis(1);
        lock(&presence.tried_last).insert("dead:1".into(), served);
        assert_eq!(presence.in_order("svc", &holders), ["dead:1", "frozen:1"]);
        assert_eq!(presence.in_order("svc", &holders), ["frozen:1", "dead:1"]);
        presence.reached("dead:1");
        assert_eq!(presence.in_order("svc", &holders), ["dead:1", "frozen:1"]);
    }

    /// A name counts as listed lately for `RETURN_WITHIN` after a read last saw its agent: records
    /// that go on naming it as departed do not extend that (GETs waited their whole timeout for
    /// 20-30 s after an agent stopped), but one that is the first to name it starts it.
    #[tokio::test]
    async fn departed_names_count_from_when_their_agent_was_seen() {
        let presence = at("10.0.0.1:80").await;
        let announce = |agents: &[&str], departed: &[&str]| {
            let agents: Vec<Value> = agents.iter().map(|name| json!({ "name": name })).collect();
            let record = json!({
                "instance": "other",
                "address": "10.0.0.2:80",
                "agents": agents,
                "departed": departed,
            });
            let record = Bytes::from(record.to_string());
            presence.store.announce("other", record, ANNOUNCEMENT_TTL)
        };
        announce(&["svc"], &[]).await.expect("announced");
        presence.read().await.expect("read");
        assert!(presence.listed_lately("svc"));
        let seen_long_ago = Instant::now() - RETURN_WITHIN;
        lock(&presence.listed).insert("svc".into(), seen_long_ago);
        announce(&[], &["svc", "gone"]).await.expect("announced");
        presence.read().await.expect("read");
        assert!(
            !presence.listed_lately("svc"),
            "listed again by its departure"
        );
        assert!(presence.listed_lately("gone"), "first listed as departed");
    }

    /// Of the records at each address, those of the instance that started last are kept, and
    /// its predecessors' while it is taking over from them (marked).
    #[test]
    fn the_latest_started_holds_an_address() {
        let records = vec![
            ("a", 5, false, "old"),
            ("a", 9, false, "new"),
            ("b", 1, false, "only"),
            ("c", 0, false, "x"),
            ("d", 3, true, "upgraded"),
            ("d", 2, false, "upgrading"),
        ];
        let kept = current_at_each_address(records, |r| r.0.to_owned(), |r| r.1, |r| r.2);
        let kept: Vec<(&str, bool)> = kept.iter().map(|(r, moving)| (r.3, *moving)).collect();
        assert_eq!(
            kept,
            [
                ("new", false),
                ("only", false),
                ("x", false),
                ("upgraded", false),
                ("upgrading", true)
            ]
        );
    }

    /// Another id at this instance's address is its predecessor's for a record's lifetime after
    /// the start, then a live instance sharing the address by mistake, taken as another one.
    #[tokio::test]
    async fn another_id_at_this_address_is_a_predecessor_only_at_first() {
        let mut presence = at("10.0.0.1:80").await;
        let me = presence.instance().to_owned();
        let before = presence.started_ms - 1;
        assert!(!presence.is_other(&me, "10.0.0.2:80", before));
        assert!(presence.is_other("other", "10.0.0.2:80", before));
        assert!(!presence.is_other("other", "10.0.0.1:80", before));
        presence.started = Instant::now() - PREDECESSOR_WITHIN;
        assert!(presence.is_other("other", "10.0.0.1:80", before));
        assert!(!presence.is_other(&me, "10.0.0.1:80", before));
    }

    /// A newer id at this instance's address is its successor's (restarted in place, or
    /// upgraded), which takes the connections made there once this one stops: another instance,
    /// and no mistake to warn of.
    #[tokio::test]
    async fn a_successor_at_this_address_is_another_instance() {
        let presence = at("10.0.0.1:80").await;
        let after = presence.started_ms + 1;
        assert!(presence.is_other("successor", "10.0.0.1:80", after));
        assert!(!presence.warned_shared_address.load(Ordering::Relaxed));
    }
}
