//! Which connection a command goes out on.
//!
//! Pingora runs each worker thread as its own single-threaded runtime (`work_stealing: false` in
//! `conf/burrow.yaml`). A connection whose tasks live on the request's own thread answers without
//! waking another thread, and those wake-ups were where most of the relay's time went under load
//! (perf: context switches and futex calls, with fred's own code under 1 %). So each such thread
//! opens its own multiplexed connection on first use, as each nginx worker of the Lua relay had
//! its own. Until that connection is up, and on any other kind of runtime, commands use the
//! shared pool, whose tasks run on the store's runtime.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use fred::prelude::{Builder, Client, ClientLike, Pool};
use tokio::runtime::{Handle, RuntimeFlavor};

use super::clock::ServerClock;

/// Tells the stores of one process apart in [`LOCAL`] (tests open many).
static NEXT_STORE: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This thread's own connection to each store that has been used from it.
    static LOCAL: RefCell<Vec<(u64, Client)>> = const { RefCell::new(Vec::new()) };
}

/// The store's command connections: the shared pool and one per single-threaded runtime; and the
/// server's clock as read over them.
pub(super) struct Clients {
    pool: Pool,
    builder: Builder,
    store: u64,
    clock: ServerClock,
}

impl Clients {
    /// `builder` makes the per-thread connections, configured like the pool's.
    pub(super) fn new(pool: Pool, builder: Builder) -> Clients {
        Clients {
            pool,
            builder,
            store: NEXT_STORE.fetch_add(1, Ordering::Relaxed),
            clock: ServerClock::default(),
        }
    }

    /// The server's clock, for the fences of data-changing scripts.
    pub(super) fn clock(&self) -> &ServerClock {
        &self.clock
    }

    /// Tells this store apart from the others of the process.
    pub(super) fn id(&self) -> u64 {
        self.store
    }

    /// The connection for a command issued from the current thread: its own when connected,
    /// otherwise a connected one of the pool (any, when none is: the command then fails fast).
    pub(super) fn pick(&self) -> Client {
        match self.local() {
            Some(client) if client.is_connected() => client,
            _ => self.shared(),
        }
    }

    /// A connected connection of the shared pool (any, when none is), for the store's own
    /// background work: it opens no connection for the thread it runs on.
    pub(super) fn shared(&self) -> Client {
        self.pool.next_connected().clone()
    }

    /// The current thread's own connection, opened (in the background) on first use; none on
    /// a multi-threaded runtime, where the connection's tasks could run on any thread.
    fn local(&self) -> Option<Client> {
        let flavor = Handle::try_current().ok()?.runtime_flavor();
        if flavor != RuntimeFlavor::CurrentThread {
            return None;
        }
        LOCAL.with(|local| {
            let mut local = local.borrow_mut();
            if let Some((_, client)) = local.iter().find(|(store, _)| *store == self.store) {
                return Some(client.clone());
            }
            let client = self.builder.build().ok()?;
            // The handle only reports the end of the connection task, which runs for the thread.
            drop(client.connect());
            local.push((self.store, client.clone()));
            Some(client)
        })
    }
}
