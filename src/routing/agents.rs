//! The registry of agents connected to this process: name → links, presence, and the choice of a
//! link for each request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

use super::exchange::{Exchange, RouteError};
use super::head::RequestHead;
use super::link::Link;

/// One connected agent, for presence (`GET /agents`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// The name requests address it by.
    pub name: String,
    /// Unix time in milliseconds.
    pub connected_since_ms: u64,
    /// Unix time in milliseconds of the last frame, ping or pong heard from the agent.
    pub last_heartbeat_ms: u64,
    /// Requests it is serving now.
    pub in_flight: usize,
    /// Whether it has not acknowledged a request for a second (see [`Link::silent`]).
    pub silent: bool,
    /// Whether it is leaving (it or the relay said GOAWAY) and takes no new requests.
    pub draining: bool,
}

/// Whether every agent of a name that takes requests here is failing, and how (both false when
/// none takes requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Every one is silent (see [`Link::silent`]): frozen, or cut off.
    pub all_silent: bool,
    /// Every one refused a request lately (see [`Link::refusing`]): its upstream is down.
    pub all_refusing: bool,
}

/// The agents connected to this process; a cheap clone around shared state.
#[derive(Clone, Default)]
pub struct Agents {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// A std mutex: held only for map updates and picks, never across an await.
    links: Mutex<HashMap<String, Vec<Arc<Link>>>>,
    next_link: AtomicU64,
    /// Rotates the choice between equally busy links.
    turn: AtomicUsize,
    /// Told when an agent connects, leaves, falls silent, speaks again or begins to drain, so
    /// presence is announced without waiting.
    changed: Notify,
    /// Told every waiter when an agent connects: requests held for an agent coming back.
    arrived: Notify,
    /// When the last link of each name that had one here lately closed (see
    /// [`Agents::had_lately`]).
    departed: Mutex<HashMap<String, Instant>>,
}

/// How long after its last link here closed a name counts as one whose agent may come back.
pub const RETURN_WITHIN: Duration = Duration::from_secs(10);

impl Agents {
    /// An empty registry.
    pub fn new() -> Agents {
        Agents::default()
    }

    /// Every connected agent, grouped by name in connection order.
    pub fn names(&self) -> Vec<AgentInfo> {
        let links = self.links();
        let mut names: Vec<&String> = links.keys().collect();
        names.sort();
        names
            .into_iter()
            .flat_map(|name| &links[name])
            .map(|link| AgentInfo {
                name: link.name.clone(),
                connected_since_ms: link.connected_since_ms,
                last_heartbeat_ms: link.last_heartbeat_ms(),
                in_flight: link.in_flight(),
                silent: link.silent(),
                draining: !link.accepting(),
            })
            .collect()
    }

    /// Sends `head` to an agent named `name` and answers the exchange that carries the request
    /// body and the response. `timeout` bounds everything up to the response head (see
    /// [`Exchange`]); a request whose agent vanishes before taking it is retried on another agent
    /// of that name.
    pub async fn forward(
        &self,
        name: &str,
        head: RequestHead,
        timeout: Duration,
    ) -> Result<Exchange, RouteError> {
        Exchange::start(self.clone(), name, head, timeout).await
    }

    /// How the agents named `name` that take requests here stand together, in one look at the
    /// registry (asked for every routed request).
    pub fn standing(&self, name: &str) -> Standing {
        let links = self.links();
        let mut accepting = links
            .get(name)
            .into_iter()
            .flatten()
            .filter(|l| l.accepting())
            .peekable();
        let any = accepting.peek().is_some();
        let mut standing = Standing {
            all_silent: any,
            all_refusing: any,
        };
        for link in accepting {
            standing.all_silent &= link.silent();
            standing.all_refusing &= link.refusing();
        }
        standing
    }

    /// The least busy accepting link of `name` not in `exclude`, silent ones last, then those
    /// refusing requests (see [`Link::silent`], [`Link::refusing`]); ties go round-robin.
    pub(crate) fn pick(&self, name: &str, exclude: &[u64]) -> Option<Arc<Link>> {
        let links = self.links();
        let candidates: Vec<&Arc<Link>> = links
            .get(name)?
            .iter()
            .filter(|link| link.accepting() && !exclude.contains(&link.id))
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let start = self.shared.turn.fetch_add(1, Ordering::Relaxed) % candidates.len();
        (0..candidates.len())
            .map(|offset| candidates[(start + offset) % candidates.len()])
            .min_by_key(|link| (link.silent(), link.refusing(), link.in_flight()))
            .cloned()
    }

    /// Whether an agent named `name` is connected here, even if only leaving, or was within
    /// [`RETURN_WITHIN`]: a request that finds none may wait for one to come back.
    pub fn had_lately(&self, name: &str) -> bool {
        if self.links().contains_key(name) {
            return true;
        }
        let departed = lock(&self.shared.departed);
        departed
            .get(name)
            .is_some_and(|at| at.elapsed() < RETURN_WITHIN)
    }

    /// The names of the agents connected here, leaving or not, and of those that left within
    /// [`RETURN_WITHIN`], in order.
    pub fn names_lately(&self) -> Vec<String> {
        let mut names = self.connected();
        names.extend(self.departed_lately());
        names.sort();
        names.dedup();
        names
    }

    /// The names of the agents connected here, leaving or not, in order.
    pub fn connected(&self) -> Vec<String> {
        let mut names: Vec<String> = self.links().keys().cloned().collect();
        names.sort();
        names
    }

    /// The names whose last agent here left within [`RETURN_WITHIN`] and none has connected
    /// since, in order.
    pub fn departed_lately(&self) -> Vec<String> {
        let links = self.links();
        let departed = lock(&self.shared.departed);
        let mut names: Vec<String> = departed
            .iter()
            .filter(|(name, at)| at.elapsed() < RETURN_WITHIN && !links.contains_key(*name))
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
    }

    /// Resolves when an agent named `name` that takes requests is connected here (true), or at
    /// `until` (false), whichever comes first.
    pub async fn arrival(&self, name: &str, until: Instant) -> bool {
        loop {
            let arrived = self.shared.arrived.notified();
            tokio::pin!(arrived);
            // Registered before the look, so that a connection between the two is not missed.
            arrived.as_mut().enable();
            if self.takes_requests(name) {
                return true;
            }
            if tokio::time::timeout_at(until.into(), arrived)
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// Whether an agent named `name` that takes requests is connected here.
    pub fn takes_requests(&self, name: &str) -> bool {
        let links = self.links();
        links
            .get(name)
            .is_some_and(|l| l.iter().any(|l| l.accepting()))
    }

    /// A link id not used before in this process.
    pub(crate) fn next_link_id(&self) -> u64 {
        self.shared.next_link.fetch_add(1, Ordering::Relaxed)
    }

    /// Resolves at the next connection or departure of an agent, or when one falls silent, speaks
    /// again or begins to drain (or at once, if one of these happened since the last call).
    pub async fn changed(&self) {
        self.shared.changed.notified().await;
    }

    /// Lists a newly connected link under its name.
    pub(crate) fn insert(&self, link: Arc<Link>) {
        self.links()
            .entry(link.name.clone())
            .or_default()
            .push(link);
        self.shared.changed.notify_one();
        self.shared.arrived.notify_waiters();
    }

    /// Tells presence that a link fell silent, spoke again or began to drain, which is worth
    /// announcing at once: other instances send requests to silent agents last, and none to
    /// draining ones.
    pub(crate) fn state_changed(&self) {
        self.shared.changed.notify_one();
    }

    /// Forgets a link that disconnected; a name without links leaves the map.
    pub(crate) fn remove(&self, link: &Link) {
        let mut links = self.links();
        if let Some(list) = links.get_mut(&link.name) {
            list.retain(|other| other.id != link.id);
            if list.is_empty() {
                links.remove(&link.name);
                let mut departed = lock(&self.shared.departed);
                departed.retain(|_, at| at.elapsed() < RETURN_WITHIN);
                departed.insert(link.name.clone(), Instant::now());
            }
        }
        drop(links);
        self.shared.changed.notify_one();
    }

    fn links(&self) -> MutexGuard<'_, HashMap<String, Vec<Arc<Link>>>> {
        lock(&self.shared.links)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only means a panic elsewhere mid-update of a plain map.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Now, in Unix milliseconds (0 on a clock before 1970).
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
