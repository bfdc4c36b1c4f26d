//! The clients a component reaches the apiserver with. kube sets no read timeout of its
//! own (a request the apiserver never answers waits forever), and one timeout cannot
//! serve both kinds of call: a write is answered in milliseconds, while a watch may sit
//! idle for minutes between events. So each component holds two clients on the same
//! configuration: [`ApiClients::requests`], whose every answer is bounded, and
//! [`ApiClients::watches`], bounded by the watcher's own idle timeout instead.

use std::time::Duration;

/// How long a request may wait for its answer by default: a write of a status or a Lease
/// is answered in milliseconds; a hung apiserver or a half-open connection then costs
/// one timeout and a retry, not the rest of a phase.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The two clients of one component; cloning them shares their connection pools.
#[derive(Clone)]
pub struct ApiClients {
    /// For gets, creates, patches, deletes and lists: an answer that has not come within
    /// the request timeout is an error (a connection error, as a reset would be), which
    /// the caller retries like any other.
    pub requests: kube::Client,
    /// For watches and the reflectors and controllers built on them.
    pub watches: kube::Client,
}

impl ApiClients {
    /// The clients of the environment's configuration (in-cluster, or the kubeconfig).
    pub async fn infer(request_timeout: Duration) -> Result<Self, kube::Error> {
        let config = kube::Config::infer()
            .await
            .map_err(kube::Error::InferConfig)?;
        Self::from_config(config, request_timeout)
    }

    /// The clients of `config`; its own read timeout is kept for the watches.
    pub fn from_config(
        config: kube::Config,
        request_timeout: Duration,
    ) -> Result<Self, kube::Error> {
        let watches = kube::Client::try_from(config.clone())?;
        let mut bounded = config;
        bounded.read_timeout = Some(request_timeout);
        // The timeout counts from when the request was sent, not from when its pooled
        // connection went idle.
        bounded.reset_reader_on_write = true;
        let requests = kube::Client::try_from(bounded)?;
        Ok(Self { requests, watches })
    }
}
