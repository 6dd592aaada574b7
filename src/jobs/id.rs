//! Job ids: opaque to clients, URL-safe, and carrying what any instance needs to find the job
//! again — its queue and its message id, as `{queue}.{message id}` (tunnel ids have no `.`).

use std::fmt;
use std::str::FromStr;

use crate::tunnel::{MessageId, TunnelId};

/// A job's id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobId {
    queue: TunnelId,
    msg: MessageId,
}

impl JobId {
    /// The job that is message `msg` of `queue`.
    pub fn new(queue: TunnelId, msg: MessageId) -> JobId {
        JobId { queue, msg }
    }

    /// The queue (tunnel) the job was triggered on.
    pub fn queue(&self) -> &TunnelId {
        &self.queue
    }

    /// The job's message id in its queue.
    pub fn msg(&self) -> MessageId {
        self.msg
    }
}

impl FromStr for JobId {
    type Err = ();

    fn from_str(raw: &str) -> Result<JobId, ()> {
        let (queue, msg) = raw.rsplit_once('.').ok_or(())?;
        Ok(JobId {
            queue: TunnelId::parse(queue).ok_or(())?,
            msg: msg.parse()?,
        })
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.queue, self.msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids round-trip; anything else is not an id.
    #[test]
    fn round_trip() {
        let id: JobId = "my-queue.1746450313373-0".parse().unwrap();
        assert_eq!(id.queue().as_str(), "my-queue");
        assert_eq!(id.to_string(), "my-queue.1746450313373-0");
        for bad in ["", "jobs", "jobs.", ".1-0", "jobs.x", "a.b.1-0", "a b.1-0"] {
            assert!(bad.parse::<JobId>().is_err(), "{bad}");
        }
    }
}
