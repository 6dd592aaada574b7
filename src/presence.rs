//! Presence (PROTOCOL.md part 3, askr's connected state): which agents are connected to which
//! relay instance. Every instance announces its address and its agents in the store a few times
//! per expiry period, so an instance that vanished leaves the list by itself, and an agent that
//! vanished leaves its instance's list once its heartbeats stop. `GET /agents` lists every
//! instance's agents, and a request for an agent connected elsewhere is sent to that instance.

use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};

use crate::routing::Agents;
use crate::store::{Store, StoreError};

/// How often an instance announces itself.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(5);

/// How soon a failed announcement is tried again.
pub const ANNOUNCE_RETRY: Duration = Duration::from_millis(500);

/// How long an announcement lasts: three missed announcements and the instance is gone.
const ANNOUNCEMENT_TTL: Duration = Duration::from_secs(15);

/// This instance's presence, and the view of everyone's.
#[derive(Clone)]
pub struct Presence {
    store: Store,
    agents: Agents,
    instance: String,
    address: String,
}

impl Presence {
    /// The presence of this instance, reachable by other instances at `address` (`host:port`).
    pub fn new(store: Store, agents: Agents, address: String) -> Presence {
        let instance = format!("{:016x}", fastrand::u64(..));
        Presence {
            store,
            agents,
            instance,
            address,
        }
    }

    /// This instance's id.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Records this instance's address and agents in the store.
    pub async fn announce(&self) -> Result<(), StoreError> {
        self.record(self.local_agents()).await
    }

    /// Records this instance with no agents, as it stops: other instances stop sending it
    /// requests at once instead of when its record expires.
    pub async fn withdraw(&self) -> Result<(), StoreError> {
        self.record(Vec::new()).await
    }

    /// Resolves when an agent connects here or leaves, which is worth announcing at once.
    pub async fn agents_changed(&self) {
        self.agents.changed().await;
    }

    async fn record(&self, agents: Vec<Value>) -> Result<(), StoreError> {
        let record = json!({
            "instance": self.instance,
            "address": self.address,
            "agents": agents,
        });
        let record = Bytes::from(record.to_string());
        self.store
            .announce(&self.instance, record, ANNOUNCEMENT_TTL)
            .await
    }

    /// Every instance's agents, each with its `instance`; this instance's are always current.
    pub async fn all(&self) -> Result<Vec<Value>, StoreError> {
        let mut agents = self.local_agents();
        for record in self.others().await? {
            if let Some(Value::Array(theirs)) = record.get("agents") {
                agents.extend(theirs.iter().cloned());
            }
        }
        Ok(agents)
    }

    /// The addresses of the other instances with an agent named `name`, in random order so that
    /// instances sharing a name share its requests.
    pub async fn holders(&self, name: &str) -> Result<Vec<String>, StoreError> {
        let mut addresses: Vec<String> = self
            .others()
            .await?
            .into_iter()
            .filter(|record| {
                record["agents"]
                    .as_array()
                    .is_some_and(|agents| agents.iter().any(|a| a["name"] == name))
            })
            .filter_map(|record| record["address"].as_str().map(String::from))
            .collect();
        fastrand::shuffle(&mut addresses);
        Ok(addresses)
    }

    /// The records of the other live instances.
    async fn others(&self) -> Result<Vec<Value>, StoreError> {
        let records = self.store.instances().await?;
        Ok(records
            .iter()
            .filter_map(|record| serde_json::from_slice::<Value>(record).ok())
            .filter(|record| record["instance"] != self.instance.as_str())
            .collect())
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
                })
            })
            .collect()
    }
}
