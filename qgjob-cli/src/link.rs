//! [`HttpLink`]: the agent protocol of `docs/http-api.md` spoken over HTTP, so the core
//! [`Agent`](qgjob_core::agent::Agent) drives devices against a remote `qgjob server`.
//!
//! The HTTP client is blocking (ureq); each call runs on tokio's blocking pool so a
//! long-polling lease never stalls the runtime.

use std::time::Duration;

use async_trait::async_trait;
use qgjob_core::agent::{AgentLink, LinkError};
use qgjob_core::{
    DeviceId, DeviceInfo, HeartbeatAck, InfraFailure, JobId, JobState, Lease, LeaseId, RunReport,
};

use crate::client::Client;
use crate::error::CliError;

/// An [`AgentLink`] over HTTP.
#[derive(Debug, Clone)]
pub struct HttpLink {
    client: Client,
}

impl HttpLink {
    /// A link through `client` (which carries the server URL and the agent token).
    pub fn new(client: Client) -> Self {
        HttpLink { client }
    }
}

/// Maps a client error to what the agent should do about it.
pub fn link_error(e: CliError) -> LinkError {
    match e {
        CliError::Api {
            status: 409,
            code,
            message,
        } if code == "stale_lease" => {
            let _ = message;
            LinkError::Stale
        }
        CliError::Api {
            status: 409,
            code,
            message,
        } if code == "device_held" => LinkError::Held(message),
        // A timeout, a rate limit or a full intake says "later", not "never": retry them
        // like a 5xx, without counting them against the report's patience.
        CliError::Api {
            status: 408 | 429, ..
        } => LinkError::Busy(e.to_string()),
        CliError::Api {
            status: 503,
            ref code,
            ..
        } if code == "unavailable" => LinkError::Busy(e.to_string()),
        // Any other 4xx (a missing or wrong token, an unknown device, a bad request) comes
        // back the same however often it is sent.
        CliError::Api {
            status, message, ..
        } if (400..500).contains(&status) => LinkError::Rejected(message),
        other => LinkError::Transport(other.to_string()),
    }
}

impl HttpLink {
    async fn call<T, F>(&self, f: F) -> Result<T, LinkError>
    where
        T: Send + 'static,
        F: FnOnce(&Client) -> Result<T, CliError> + Send + 'static,
    {
        let c = self.client.clone();
        match tokio::task::spawn_blocking(move || f(&c)).await {
            Ok(r) => r.map_err(link_error),
            Err(e) => Err(LinkError::Transport(format!("request task failed: {e}"))),
        }
    }
}

#[async_trait]
impl AgentLink for HttpLink {
    async fn register(&self, device: DeviceInfo) -> Result<(), LinkError> {
        self.call(move |c| c.register_device(&device).map(|_| ()))
            .await
    }

    async fn unregister(&self, device: &DeviceId, session: Option<&str>) -> Result<(), LinkError> {
        let d = device.clone();
        let s = session.map(String::from);
        self.call(move |c| c.unregister_device(&d, s.as_deref()))
            .await
    }

    async fn lease(
        &self,
        device: &DeviceId,
        session: Option<&str>,
        max_batch: usize,
        wait: Duration,
    ) -> Result<Option<Lease>, LinkError> {
        let d = device.clone();
        let s = session.map(String::from);
        self.call(move |c| c.lease(&d, s.as_deref(), max_batch, wait))
            .await
    }

    async fn heartbeat(&self, lease: LeaseId) -> Result<HeartbeatAck, LinkError> {
        self.call(move |c| c.heartbeat(lease)).await
    }

    async fn complete(
        &self,
        lease: LeaseId,
        job: JobId,
        report: RunReport,
    ) -> Result<JobState, LinkError> {
        self.call(move |c| c.complete(lease, job, &report)).await
    }

    async fn fail(
        &self,
        lease: LeaseId,
        job: JobId,
        failure: InfraFailure,
    ) -> Result<JobState, LinkError> {
        self.call(move |c| c.fail(lease, job, &failure)).await
    }

    async fn log(&self, lease: LeaseId, job: JobId, text: &str) -> Result<(), LinkError> {
        let t = text.to_string();
        self.call(move |c| c.append_log(lease, job, &t)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_agent_actions() {
        let api = |status, code: &str| CliError::Api {
            status,
            code: code.into(),
            message: "m".into(),
        };
        assert_eq!(link_error(api(409, "stale_lease")), LinkError::Stale);
        assert_eq!(
            link_error(api(409, "device_held")),
            LinkError::Held("m".into())
        );
        assert_eq!(
            link_error(api(409, "device_taken")),
            LinkError::Rejected("m".into())
        );
        assert_eq!(
            link_error(api(404, "not_found")),
            LinkError::Rejected("m".into())
        );
        assert!(matches!(
            link_error(api(503, "unavailable")),
            LinkError::Busy(_)
        ));
        // A standby or a proxy in front of a server that is down: the server is away.
        for away in [
            api(503, "standby"),
            api(502, "bad_gateway"),
            api(500, "internal"),
        ] {
            assert!(matches!(link_error(away), LinkError::Transport(_)));
        }
        assert_eq!(
            link_error(api(401, "unauthorized")),
            LinkError::Rejected("m".into())
        );
        assert_eq!(
            link_error(api(403, "forbidden")),
            LinkError::Rejected("m".into())
        );
        for retryable in [408, 429] {
            assert!(matches!(
                link_error(api(retryable, "later")),
                LinkError::Busy(_)
            ));
        }
        assert!(matches!(
            link_error(CliError::Unreachable {
                url: "u".into(),
                reason: "connection refused".into()
            }),
            LinkError::Transport(_)
        ));
    }

    #[tokio::test]
    async fn unreachable_server_is_a_transport_error() {
        let link = HttpLink::new(Client::new("http://127.0.0.1:1", None));
        let e = link.heartbeat(LeaseId(1)).await.unwrap_err();
        assert!(matches!(e, LinkError::Transport(m) if m.contains("connection refused")));
    }
}
