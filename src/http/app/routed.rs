//! Where a routed request goes (PROTOCOL.md part 3): to an agent of its name connected here,
//! else, or when those here are all silent or refusing, on to another instance that has one,
//! trying each instance once. The exchange itself is `forward`'s.

use std::time::{Duration, Instant};

use pingora_core::protocols::http::ServerSession;

use super::{client_gone, After, Outcome, RelayApp};
use crate::error::Error;
use crate::http::forward::{self, Body, Hop};
use crate::metrics::Waiting;
use crate::routing::RouteError;
use crate::tunnel::{Shutdown, TunnelId};

/// How long at most a request waits for an agent of its name to come back (see
/// [`RelayApp::forward`]).
const AWAIT_RETURN: Duration = Duration::from_secs(5);

/// How long at most a request with a body still to read waits for an agent (only in the new
/// process of an upgrade; see [`RelayApp::forward`]).
const AWAIT_WITH_BODY: Duration = Duration::from_secs(1);

/// How often a request waiting for an agent to come back reads presence again.
const LOOK_AGAIN_EVERY: Duration = Duration::from_millis(200);

impl RelayApp {
    /// Forwards a request to agent `agent`; answers before the grace period ends, rather than
    /// drop the connection of a request whose agent is still at work when the runtimes go.
    pub(super) async fn route(
        &self,
        session: &mut ServerSession,
        agent: TunnelId,
        path: String,
        timeout: Option<Duration>,
        shutdown: &mut Shutdown,
    ) -> Result<Outcome, Error> {
        if *shutdown.borrow() {
            return self
                .route_while_stopping(session, agent, path, timeout)
                .await;
        }
        let stopping = Some(shutdown.clone());
        tokio::select! {
            outcome = self.forward(session, &agent, path, timeout, stopping) => outcome,
            () = grace_ends(shutdown, self.grace) => Err(Error::ShuttingDown),
        }
    }

    /// [`RelayApp::route`] once the relay is stopping and has let its agents go. A request sent
    /// by another instance goes to the process this one handed its address over to, if any, or
    /// is refused, and that instance tries the next. One that comes on a kept-alive connection
    /// follows its agents to the instances they moved to, or to that new process, if its timeout
    /// ends before the grace period does; or is told to retry (elsewhere), not that its agent
    /// does not exist. (Sent on, and then told to retry when the grace period cut it, a request
    /// could run twice.)
    async fn route_while_stopping(
        &self,
        session: &mut ServerSession,
        agent: TunnelId,
        path: String,
        timeout: Option<Duration>,
    ) -> Result<Outcome, Error> {
        let handed_over = *self.handing_over.borrow();
        let patience = timeout.unwrap_or(self.route_timeout);
        let in_time = patience
            <= self
                .in_flight
                .grace_left(self.grace)
                .saturating_sub(ANSWER_TIME);
        if forward::from_another_instance(session) {
            let gone = RouteError::Refused(Box::new(RouteError::NoAgent(agent.to_string())));
            if !handed_over || !in_time {
                return Err(gone.into());
            }
            let deadline = Instant::now() + patience;
            // The new process sends no request on again: this is the hop's last.
            let (own, mut tried) = (vec![self.presence.address().to_owned()], Tried::default());
            let sent = self.send_on(session, &agent, own, &mut tried, deadline);
            return sent.await?.ok_or_else(|| gone.into());
        }
        if (!self.shared_store && !handed_over) || !in_time {
            return Err(Error::ShuttingDown);
        }
        match self.forward(session, &agent, path, timeout, None).await {
            Err(Error::Route(RouteError::NoAgent(_))) => Err(Error::ShuttingDown),
            outcome => outcome,
        }
    }

    /// Forwards a request to agent `agent`: over its link when it is connected here, else
    /// through the instance that holds it. When none is connected anywhere but one of the name
    /// was lately (it is restarting, or moving off a stopping instance), or might have been (this
    /// process took over from another less than `RETURN_WITHIN` ago), the request waits up to
    /// [`AWAIT_RETURN`] (within its timeout) for one to come back, unless the relay begins to
    /// stop meanwhile (`stopping`; then it is told to retry elsewhere) or its client leaves. A
    /// request with a body waits only in such a new process, up to [`AWAIT_WITH_BODY`]. A request
    /// another instance sent here is refused (for that one to try the next), or in such a new
    /// process waits as well.
    async fn forward(
        &self,
        session: &mut ServerSession,
        agent: &TunnelId,
        path: String,
        timeout: Option<Duration>,
        stopping: Option<Shutdown>,
    ) -> Result<Outcome, Error> {
        let hop = forward::from_another_instance(session);
        let outcome = self
            .await_agent(session, agent, path, timeout, stopping)
            .await;
        if !hop {
            return outcome;
        }
        // Refused, for the other instance to try the next one listed with the name, when no agent
        // here took it and it could go elsewhere.
        outcome.map_err(|failure| match failure {
            Error::Route(RouteError::NoAgent(name)) => {
                RouteError::Refused(Box::new(RouteError::NoAgent(name))).into()
            }
            Error::Route(RouteError::NotTaken(why)) if forward::sendable_again(session) => {
                // Agents here are leaving: as far as the other instance is concerned, none is here.
                let failure = if self.agents.takes_requests(agent.as_str()) {
                    RouteError::NotTaken(why)
                } else {
                    RouteError::NoAgent(agent.to_string())
                };
                RouteError::Refused(Box::new(failure)).into()
            }
            other => other,
        })
    }

    /// [`RelayApp::forward`], but for a request from another instance the failure as it is here.
    async fn await_agent(
        &self,
        session: &mut ServerSession,
        agent: &TunnelId,
        path: String,
        timeout: Option<Duration>,
        mut stopping: Option<Shutdown>,
    ) -> Result<Outcome, Error> {
        let deadline = Instant::now() + timeout.unwrap_or(self.route_timeout);
        let origin = !forward::from_another_instance(session);
        // A request another instance sent here stops waiting in time for that one to answer its
        // client: else it would time out there first (504), and this instance be tried last.
        let answer_by = if origin {
            deadline
        } else {
            deadline.checked_sub(ANSWER_TIME).unwrap_or(deadline)
        };
        let hold_until = answer_by.min(Instant::now() + AWAIT_RETURN);
        let hold_body_until = answer_by.min(Instant::now() + AWAIT_WITH_BODY);
        // Stopped after handing the address over: the connections made there reach the new
        // process, which takes this one's agents.
        let handed_over = stopping.is_none() && *self.handing_over.borrow();
        loop {
            let once = self.forward_once(session, agent, &path, deadline, handed_over);
            let failure = match once.await {
                Err(Error::Route(RouteError::NoAgent(name))) => RouteError::NoAgent(name),
                // Refused before it was taken (its HEAD crossed the agent's GOAWAY) or lost with
                // the agent's connection, by agents none of which takes requests now: they are
                // leaving, and the request, whose body is not read yet, may wait as well.
                Err(Error::Route(RouteError::NotTaken(why)))
                    if forward::sendable_again(session)
                        && !self.agents.takes_requests(agent.as_str()) =>
                {
                    RouteError::NotTaken(why)
                }
                answered => return answered,
            };
            // Another instance sent it here: that one waits, unless this is the new process of an
            // upgrade, whose predecessor's agents come within moments (the other instance sent it
            // here for them). A request whose body is still to be read waits only in such a new
            // process, and briefly: whether its client left cannot be seen without reading the
            // body, and one that left must not be sent on once the agent is back.
            let new_process = self
                .successor_until
                .is_some_and(|until| Instant::now() < until);
            let lately = self.agents.had_lately(agent.as_str())
                || self.presence.listed_lately(agent.as_str())
                || new_process;
            let body_unread = !session.is_body_done();
            let until = if body_unread {
                hold_body_until
            } else {
                hold_until
            };
            let now = Instant::now();
            if (!origin && !new_process) || !lately || (body_unread && !new_process) || now >= until
            {
                return Err(failure.into());
            }
            // Sent here for an agent on its way, when one of the name is at another instance
            // now (the sender's read was older): refused, for the sender to read again and go
            // there, rather than wait.
            if !origin && self.held_elsewhere(agent, deadline).await {
                return Err(failure.into());
            }
            // Presence is read again at most this often; an agent connecting here ends the wait.
            let _waiting = Waiting::for_agent();
            let look_again = until.min(now + LOOK_AGAIN_EVERY);
            let arrived = tokio::select! {
                arrived = self.agents.arrival(agent.as_str(), look_again) => arrived,
                () = begins_to_stop(&mut stopping) => return Err(Error::ShuttingDown),
                () = client_gone(session), if !body_unread => return Err(Error::ClientGone),
            };
            // At the end of the wait, a look at the store could only time out (504): the name
            // is still not found.
            if !arrived && Instant::now() >= until {
                return Err(failure.into());
            }
        }
    }

    /// One try of [`RelayApp::forward`]: here, then at the other instances with the name (and at
    /// this one's address, once this process has `handed_over` it and stopped taking connections
    /// there: they reach the new process).
    async fn forward_once(
        &self,
        session: &mut ServerSession,
        agent: &TunnelId,
        path: &str,
        deadline: Instant,
        handed_over: bool,
    ) -> Result<Outcome, Error> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        // `Authorization` is the relay's business, unless the agent is public; even then
        // the relay's own token is never passed on.
        let authorizations = session.req_header().headers.get_all("Authorization");
        let relays = |v: &http::HeaderValue| self.auth.carries_relay_token(v.as_bytes());
        let withhold = self.auth.enabled()
            && (!self.auth.is_public(agent.as_str()) || authorizations.iter().any(relays));
        let mut tried = Tried::default();
        if let Some(outcome) = self
            .past_failing_agents(session, agent, &mut tried, deadline)
            .await?
        {
            return Ok(outcome);
        }
        let path = path.to_owned();
        let local = forward::open(session, &self.agents, agent, path, timeout, withhold);
        let failure = match local.await {
            Ok((head, exchange)) => {
                return Ok(Outcome::Respond(
                    head,
                    Some(After::Forward(Body::Agent(Box::new(exchange)))),
                ))
            }
            Err(failure) => failure,
        };
        // Not connected here, or every agent here lost the request before taking it: maybe
        // another instance has the name, unless that one sent it. A body read here cannot be sent
        // again, so only a request without one (or with an empty one) is.
        let elsewhere = match &failure {
            Error::Route(RouteError::NoAgent(_)) => true,
            Error::Route(RouteError::NotTaken(_)) => forward::sendable_again(session),
            _ => false,
        };
        if !elsewhere {
            return Err(failure);
        }
        // Sent here by another instance: that one tries the next instance listed with the name.
        if forward::from_another_instance(session) {
            return Err(failure);
        }
        match self
            .to_another_instance(session, agent, &mut tried, deadline, handed_over)
            .await?
        {
            Some(outcome) => Ok(outcome),
            // None here, and agents elsewhere refused it: theirs is the answer.
            None => Err(match (failure, tried.refusal) {
                (Error::Route(RouteError::NoAgent(_)), Some(why)) => {
                    RouteError::AgentFailed(why).into()
                }
                (failure, _) => failure,
            }),
        }
    }

    /// Whether a read of the store begun now lists an agent named `agent` at another instance
    /// (store trouble: not known to).
    async fn held_elsewhere(&self, agent: &TunnelId, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        let holders = tokio::time::timeout(left, self.presence.holders(agent.as_str())).await;
        let own = self.presence.address();
        let holders = holders.ok().and_then(Result::ok).unwrap_or_default();
        holders.iter().any(|address| address != own)
    }

    /// When every agent of the name here is silent (frozen, or cut off before its heartbeat
    /// expires) or refusing (its upstream down), sends the request to another instance whose
    /// agent answers, if one has the name. Not a request sent here by another instance (that one
    /// chose this one); nor, past silent agents, one with a body, which could not come back here
    /// if that instance refused it after reading it (refusing agents here would only refuse it).
    async fn past_failing_agents(
        &self,
        session: &mut ServerSession,
        agent: &TunnelId,
        tried: &mut Tried,
        deadline: Instant,
    ) -> Result<Option<Outcome>, Error> {
        let standing = self.agents.standing(agent.as_str());
        let failing =
            standing.all_refusing || (standing.all_silent && forward::sendable_again(session));
        if !failing || forward::from_another_instance(session) {
            return Ok(None);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let answering = self.presence.answering_holders(agent.as_str());
        // Store trouble leaves the request to the agents here, as before.
        let answering = tokio::time::timeout(left, answering).await;
        let addresses = answering.ok().and_then(Result::ok).unwrap_or_default();
        self.send_on(session, agent, addresses, tried, deadline)
            .await
    }

    /// Sends the request to another instance with an agent of the name. Where the name was
    /// found lately is tried first; when none of those takes the request (the agent moved, an
    /// instance went), the store is read for any others. A request with a body could not go on
    /// after such a refusal, so it is sent where the store says now.
    async fn to_another_instance(
        &self,
        session: &mut ServerSession,
        agent: &TunnelId,
        tried: &mut Tried,
        deadline: Instant,
        handed_over: bool,
    ) -> Result<Option<Outcome>, Error> {
        let remembered = forward::sendable_again(session)
            .then(|| self.presence.remembered_holders(agent.as_str()))
            .flatten();
        if let Some(addresses) = remembered {
            if let Some(outcome) = self
                .send_on(session, agent, addresses, tried, deadline)
                .await?
            {
                return Ok(Some(outcome));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let holders = tokio::time::timeout(left, self.presence.holders(agent.as_str()));
        let mut addresses = holders.await.map_err(|_| RouteError::Timeout)??;
        let own = self.presence.address();
        if handed_over && !addresses.iter().any(|address| address == own) {
            addresses.push(own.to_owned());
        }
        self.send_on(session, agent, addresses, tried, deadline)
            .await
    }

    /// Sends the request on to the first of the instances at `addresses` not yet `tried` that
    /// takes it. An instance killed without a goodbye stays listed until its record expires: a
    /// request it never received goes on to the next one, and it is tried last for a while.
    async fn send_on(
        &self,
        session: &mut ServerSession,
        agent: &TunnelId,
        addresses: Vec<String>,
        tried: &mut Tried,
        deadline: Instant,
    ) -> Result<Option<Outcome>, Error> {
        let instance = self.presence.instance();
        for address in addresses {
            if tried.addresses.contains(&address) {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let proxied = forward::proxy(session, &self.proxy, &address, instance, left);
            match proxied.await? {
                Hop::Answered(head, response) => {
                    self.presence.reached(&address);
                    let body = Body::Instance(response);
                    return Ok(Some(Outcome::Respond(head, Some(After::Forward(body)))));
                }
                Hop::Refused { again, failed } => {
                    self.presence.reached(&address);
                    self.presence.refused(&address, agent.as_str());
                    if !again {
                        let gone = "the relay instance listed with the agent no longer has it";
                        let why = failed.unwrap_or_else(|| gone.to_owned());
                        return Err(RouteError::AgentFailed(why).into());
                    }
                    tried.refusal = failed.or(tried.refusal.take());
                }
                Hop::Failed { why, again } => {
                    // Once per address while it stays unreachable: every request would log it.
                    if self.presence.unreachable(&address) {
                        log::warn!("forwarding to the instance at {address}: {why}");
                    } else {
                        log::debug!("forwarding to the instance at {address}: {why}");
                    }
                    if !again {
                        // The client learns that the hop failed, not the store's addresses.
                        let why = "the relay instance with the agent did not answer";
                        return Err(RouteError::AgentFailed(why.to_owned()).into());
                    }
                }
                // Frozen, or its node gone: the name's next requests try the others first.
                Hop::TimedOut => {
                    if self.presence.unreachable(&address) {
                        log::warn!("forwarding to the instance at {address}: no answer in time");
                    }
                    return Err(RouteError::Timeout.into());
                }
            }
            tried.addresses.push(address);
        }
        Ok(None)
    }
}

/// The other instances a request was sent to, and why their agents refused it, if they did.
#[derive(Default)]
struct Tried {
    addresses: Vec<String>,
    refusal: Option<String>,
}

/// How long before the relay's runtimes stop a request must have its answer: the time an answer
/// takes to write.
const ANSWER_TIME: Duration = Duration::from_millis(250);

/// Resolves shortly before the relay's runtimes stop: `grace` after shutdown began, less
/// [`ANSWER_TIME`].
async fn grace_ends(shutdown: &mut Shutdown, grace: Duration) {
    crate::tunnel::stopping(shutdown).await;
    tokio::time::sleep(grace.saturating_sub(ANSWER_TIME)).await;
}

/// Resolves when the relay begins to stop; never without a watch (it is stopping already).
async fn begins_to_stop(stopping: &mut Option<Shutdown>) {
    match stopping {
        Some(shutdown) => crate::tunnel::stopping(shutdown).await,
        None => std::future::pending().await,
    }
}
