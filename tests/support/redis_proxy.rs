//! A TCP proxy in front of a redis-server that can make the server forget a relay's subscriptions
//! without the relay being told: the one state that only a race produces otherwise (a subscriber
//! connection the server dropped, whose loss the client has not noticed yet). It can also hold
//! back the server's answers, as a server far away would, and make the server's clock seem to
//! step forward right after the relay first reads it, and hold back what subscriber connections
//! send while passing on what they receive, as a server slow to run a new subscription would.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use super::RedisServer;

/// Forwards every connection to one redis-server and remembers the ones that subscribed.
pub struct RedisProxy {
    port: u16,
    subscribers: Arc<Mutex<Vec<TcpStream>>>,
    /// The clients' side of every connection, held so that none is closed before the proxy is.
    clients: Arc<Mutex<Vec<TcpStream>>>,
    clock: Arc<Clock>,
    gate: Arc<Gate>,
}

impl RedisProxy {
    /// A proxy on a free port in front of `server`.
    pub fn start(server: &RedisServer) -> RedisProxy {
        RedisProxy::with_delay(server, Duration::ZERO)
    }

    /// A proxy that passes on each read of the server's answers `delay` after it came.
    pub fn with_delay(server: &RedisServer, delay: Duration) -> RedisProxy {
        RedisProxy::started(server, delay, Clock::new(0, 0))
    }

    /// A proxy that answers the first `TIME` it passes on `behind_s` seconds early, as if the
    /// server's clock stepped forward by that much once the relay had read it.
    pub fn with_clock_stepped(server: &RedisServer, behind_s: u64) -> RedisProxy {
        RedisProxy::started(server, Duration::ZERO, Clock::new(behind_s, 1))
    }

    /// A proxy that answers every `TIME` `behind_s` seconds early, as a second server whose
    /// clock disagrees with the scripts' would.
    pub fn with_clock_behind(server: &RedisServer, behind_s: u64) -> RedisProxy {
        RedisProxy::started(server, Duration::ZERO, Clock::new(behind_s, u64::MAX))
    }

    fn started(server: &RedisServer, delay: Duration, clock: Clock) -> RedisProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port for the proxy");
        let port = listener.local_addr().expect("a bound address").port();
        let target = server.url().replace("redis://", "");
        let subscribers = Arc::new(Mutex::new(Vec::new()));
        let clients = Arc::new(Mutex::new(Vec::new()));
        let clock = Arc::new(clock);
        let gate = Arc::new(Gate::default());
        let proxy = RedisProxy {
            port,
            subscribers: Arc::clone(&subscribers),
            clients: Arc::clone(&clients),
            clock: Arc::clone(&clock),
            gate: Arc::clone(&gate),
        };
        thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let clock = Arc::clone(&clock);
                let gate = Arc::clone(&gate);
                forward(client, server, delay, (clock, gate), &subscribers, &clients);
            }
        });
        proxy
    }

    /// How many `TIME` answers have passed.
    pub fn clock_readings(&self) -> u64 {
        self.clock.answered.load(Ordering::SeqCst)
    }

    /// Holds back what subscriber connections send from now on, until [`RedisProxy::release`].
    pub fn hold_subscribers(&self) {
        *self.gate.closed.lock().expect("not poisoned") = true;
    }

    /// Passes on what subscriber connections were held back from sending, and all they send.
    pub fn release(&self) {
        *self.gate.closed.lock().expect("not poisoned") = false;
        self.gate.opened.notify_all();
    }

    /// How many of a subscriber connection's writes are held back.
    pub fn held(&self) -> u64 {
        self.gate.held.load(Ordering::SeqCst)
    }

    /// `redis://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Closes the server's side of every connection that sent a `SUBSCRIBE` or `PSUBSCRIBE`;
    /// their clients' side stays open and silent.
    pub fn cut_subscribers(&self) {
        let subscribers = self.subscribers.lock().expect("not poisoned");
        for server in subscribers.iter() {
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for RedisProxy {
    fn drop(&mut self) {
        for client in self.clients.lock().expect("not poisoned").iter() {
            let _ = client.shutdown(Shutdown::Both);
        }
    }
}

/// The `TIME` answers set back, shared by all connections: how many more, and by how much.
struct Clock {
    behind_s: u64,
    to_set_back: AtomicU64,
    answered: AtomicU64,
}

impl Clock {
    fn new(behind_s: u64, answers: u64) -> Clock {
        Clock {
            behind_s,
            to_set_back: AtomicU64::new(answers),
            answered: AtomicU64::new(0),
        }
    }

    /// Counts a `TIME` answer (`*2 $10 <seconds> $N <micros>`) in `answer`, if `asked` says the
    /// connection sent `TIME`, and sets back its seconds while answers are left to set back.
    fn apply(&self, asked: &AtomicBool, answer: &mut [u8]) {
        const HEAD: &[u8] = b"*2\r\n$10\r\n";
        if !asked.load(Ordering::SeqCst) {
            return;
        }
        let Some(at) = answer.windows(HEAD.len()).position(|w| w == HEAD) else {
            return;
        };
        let digits = &mut answer[at + HEAD.len()..];
        let Some(seconds) = digits
            .get(..10)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| d.parse::<u64>().ok())
        else {
            return;
        };
        self.answered.fetch_add(1, Ordering::SeqCst);
        let left = |n: u64| n.checked_sub(1);
        if self
            .to_set_back
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, left)
            .is_ok()
        {
            let earlier = format!("{:010}", seconds - self.behind_s);
            digits[..10].copy_from_slice(earlier.as_bytes());
        }
    }
}

/// Where subscriber connections' writes wait while they are held back.
#[derive(Default)]
struct Gate {
    closed: Mutex<bool>,
    opened: Condvar,
    held: AtomicU64,
}

impl Gate {
    /// Returns once the gate is open, counting the wait among the held writes.
    fn pass(&self) {
        let mut closed = self.closed.lock().expect("not poisoned");
        if !*closed {
            return;
        }
        self.held.fetch_add(1, Ordering::SeqCst);
        while *closed {
            closed = self.opened.wait(closed).expect("not poisoned");
        }
        self.held.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Copies bytes both ways between `client` and `server`, each way on a thread of its own.
fn forward(
    client: TcpStream,
    server: TcpStream,
    delay: Duration,
    (clock, gate): (Arc<Clock>, Arc<Gate>),
    subscribers: &Arc<Mutex<Vec<TcpStream>>>,
    clients: &Mutex<Vec<TcpStream>>,
) {
    let (Ok(mut from_client), Ok(mut to_client), Ok(mut to_server), Ok(mut from_server)) = (
        client.try_clone(),
        client.try_clone(),
        server.try_clone(),
        server.try_clone(),
    ) else {
        return;
    };
    clients.lock().expect("not poisoned").push(client);
    let subscribers = Arc::clone(subscribers);
    let asked_time = Arc::new(AtomicBool::new(false));
    let asks_time = Arc::clone(&asked_time);
    thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        let mut noted = false;
        while let Ok(read @ 1..) = from_client.read(&mut buffer) {
            let sent = &buffer[..read];
            if sent.windows(8).any(|w| w == b"\r\nTIME\r\n") {
                asks_time.store(true, Ordering::SeqCst);
            }
            // fred sends commands in upper case; PSUBSCRIBE contains SUBSCRIBE.
            if !noted && sent.windows(9).any(|w| w == b"SUBSCRIBE") {
                if let Ok(clone) = server.try_clone() {
                    subscribers.lock().expect("not poisoned").push(clone);
                    noted = true;
                }
            } else if noted {
                gate.pass();
            }
            if to_server.write_all(sent).is_err() {
                break;
            }
        }
    });
    thread::spawn(move || {
        let mut buffer = [0u8; 16 * 1024];
        while let Ok(read @ 1..) = from_server.read(&mut buffer) {
            thread::sleep(delay);
            clock.apply(&asked_time, &mut buffer[..read]);
            if to_client.write_all(&buffer[..read]).is_err() {
                break;
            }
        }
    });
}
