//! A fault proxy for the Kubernetes API: one instance sits between a component (an
//! agent, the operator) and the kube-apiserver, and the component's kubeconfig points at
//! it. It terminates TLS (a certificate of the harness's test CA for 127.0.0.1), forwards
//! each request over TLS to the apiserver (trusting its CA, the Authorization header
//! passed through), and streams the responses, watches included.
//!
//! The test code controls it through [`ApiProxy`]: fail the next N requests a
//! [`Matcher`] takes (by verb and resource, subresource included) with a 409 Conflict, a
//! 500, a 429 with Retry-After (each a proper `Status` body), a hang, or a reset
//! connection; or partition the component from the apiserver for a while (every open
//! connection cut, watches included, new ones reset) and heal. [`ApiProxy::injected`]
//! counts what it did, by kind.
//!
//! The proxies run on a runtime of their own, so a test thread that blocks (waiting for a
//! killed process, say) never stalls the components' API traffic.

mod matcher;
mod serve;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use matcher::{ApiRequest, Matcher, Verb, classify};

/// What the proxy answers a request a rule takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injection {
    /// 409, reason Conflict: "the object has been modified".
    Conflict,
    /// 500, reason InternalError.
    ServerError,
    /// 429, reason TooManyRequests, with `Retry-After` (and `details.retryAfterSeconds`).
    TooManyRequests { retry_after_seconds: u64 },
    /// No answer; after the duration the connection is reset. (Neither kube 5's client
    /// nor Ferry's components set a read timeout on API calls, so the client waits that
    /// long unless its caller gives up first.)
    Hang(Duration),
    /// The connection is reset at once, with no answer.
    Reset,
}

/// Kinds of injected faults, for [`ApiProxy::injected`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    Conflict,
    ServerError,
    TooManyRequests,
    Hang,
    Reset,
    /// An open connection cut when a partition began.
    PartitionCut,
    /// A new connection reset during a partition.
    PartitionRefused,
}

impl Injection {
    pub fn kind(self) -> FaultKind {
        match self {
            Injection::Conflict => FaultKind::Conflict,
            Injection::ServerError => FaultKind::ServerError,
            Injection::TooManyRequests { .. } => FaultKind::TooManyRequests,
            Injection::Hang(_) => FaultKind::Hang,
            Injection::Reset => FaultKind::Reset,
        }
    }
}

/// Why a proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("the upstream URL {0:?} is not https://<ip>:<port>")]
    Upstream(String),
    #[error("reading {what}: {source}")]
    Pem {
        what: &'static str,
        source: rustls::pki_types::pem::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("listening: {0}")]
    Listen(#[from] std::io::Error),
}

/// One request a rule failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    pub kind: FaultKind,
    pub request: ApiRequest,
}

/// An armed rule: the next `remaining` requests `matcher` takes get `injection`.
struct Rule {
    matcher: Matcher,
    injection: Injection,
    remaining: usize,
}

/// What the proxy's tasks and its handle share.
#[derive(Default)]
struct Control {
    rules: Mutex<Vec<Rule>>,
    counts: Mutex<BTreeMap<FaultKind, usize>>,
    hits: Mutex<Vec<Hit>>,
    /// While set and in the future, the component is partitioned from the apiserver.
    partitioned_until: Mutex<Option<Instant>>,
}

impl Control {
    /// The injection for `request`, if an armed rule takes it (counted and logged).
    fn take(&self, request: &ApiRequest) -> Option<Injection> {
        let mut rules = self.rules.lock().expect("the rules lock is never poisoned");
        let rule = rules
            .iter_mut()
            .find(|r| r.remaining > 0 && r.matcher.matches(request))?;
        rule.remaining -= 1;
        let injection = rule.injection;
        rules.retain(|r| r.remaining > 0);
        drop(rules);
        self.count(injection.kind());
        self.hits.lock().expect("not poisoned").push(Hit {
            kind: injection.kind(),
            request: request.clone(),
        });
        Some(injection)
    }

    fn count(&self, kind: FaultKind) {
        *self
            .counts
            .lock()
            .expect("not poisoned")
            .entry(kind)
            .or_default() += 1;
    }

    fn partitioned(&self) -> bool {
        self.partitioned_until
            .lock()
            .expect("not poisoned")
            .is_some_and(|until| Instant::now() < until)
    }
}

/// A running proxy; dropping it closes it and every connection through it.
pub struct ApiProxy {
    addr: SocketAddr,
    control: Arc<Control>,
    server: serve::Server,
}

/// The runtime every proxy of the test process runs on.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("api-proxy")
            .enable_all()
            .build()
            .expect("the proxies' runtime starts")
    })
}

impl ApiProxy {
    /// Listens on 127.0.0.1:<free port>, serving `cert_pem`/`key_pem`, and forwards to
    /// `upstream` (`https://127.0.0.1:<port>`), trusting `ca_pem`.
    pub fn start(
        upstream: &str,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<ApiProxy, ProxyError> {
        let control = Arc::new(Control::default());
        let (addr, server) = serve::Server::start(
            runtime(),
            serve::Config::new(upstream, ca_pem, cert_pem, key_pem)?,
            control.clone(),
        )?;
        Ok(ApiProxy {
            addr,
            control,
            server,
        })
    }

    /// `https://127.0.0.1:<port>`, for a kubeconfig.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The next `times` requests `matcher` takes get `injection` (after any rule armed
    /// before that takes them too).
    pub fn fail_next(&self, times: usize, matcher: Matcher, injection: Injection) {
        if times == 0 {
            return;
        }
        self.control.rules.lock().expect("not poisoned").push(Rule {
            matcher,
            injection,
            remaining: times,
        });
    }

    /// How many requests the armed rules still wait for.
    pub fn pending(&self) -> usize {
        let rules = self.control.rules.lock().expect("not poisoned");
        rules.iter().map(|r| r.remaining).sum()
    }

    /// Disarms every rule.
    pub fn clear(&self) {
        self.control.rules.lock().expect("not poisoned").clear();
    }

    /// Partitions the component from the apiserver for `period`: every open connection
    /// is cut now, watches included, and new ones are reset until then. It heals by
    /// itself.
    pub fn partition(&self, period: Duration) {
        *self.control.partitioned_until.lock().expect("not poisoned") =
            Some(Instant::now() + period);
        self.server.cut_all();
    }

    /// Ends a partition now.
    pub fn heal(&self) {
        *self.control.partitioned_until.lock().expect("not poisoned") = None;
    }

    /// Whether a partition is on.
    pub fn partitioned(&self) -> bool {
        self.control.partitioned()
    }

    /// Cuts every open connection once, without refusing new ones (as an apiserver that
    /// restarts does).
    pub fn cut_all(&self) {
        self.server.cut_all();
    }

    /// The faults injected so far, by kind.
    pub fn injected(&self) -> BTreeMap<FaultKind, usize> {
        self.control.counts.lock().expect("not poisoned").clone()
    }

    /// All injected faults of any kind.
    pub fn injected_total(&self) -> usize {
        self.injected().values().sum()
    }

    /// The requests the rules failed, in order.
    pub fn hits(&self) -> Vec<Hit> {
        self.control.hits.lock().expect("not poisoned").clone()
    }

    /// How many requests it forwarded to the apiserver.
    pub fn forwarded(&self) -> usize {
        self.server.forwarded()
    }
}
