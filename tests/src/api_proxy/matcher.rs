//! Which Kubernetes request an HTTP request is — its verb and resource (with subresource),
//! derived the way the apiserver does from the method, the path and `watch=true` — and
//! whether a fault rule's [`Matcher`] takes it. Pure, so it is tested without a server.

use std::fmt;

/// A Kubernetes API verb (as in RBAC and audit logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
    DeleteCollection,
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
            Verb::DeleteCollection => "deletecollection",
        })
    }
}

/// A request on a Kubernetes resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRequest {
    pub verb: Verb,
    /// The resource, with its subresource after a slash: `leases`,
    /// `virtualmachines/status`.
    pub resource: String,
    pub namespace: Option<String>,
    /// The object's name; `None` for a collection (list, watch, create).
    pub name: Option<String>,
}

impl fmt::Display for ApiRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if let Some(name) = &self.name {
            write!(f, " {name}")?;
        }
        Ok(())
    }
}

/// The Kubernetes request of `method` on `path` with `query`; `None` for what is not a
/// request on a resource (discovery, `/version`, `/healthz`, an unknown method).
pub fn classify(method: &str, path: &str, query: Option<&str>) -> Option<ApiRequest> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segments.as_slice() {
        ["api", _version, rest @ ..] => rest,
        ["apis", _group, _version, rest @ ..] => rest,
        _ => return None,
    };
    // The deprecated `/watch/` prefix, still served.
    let (legacy_watch, rest) = match rest {
        ["watch", rest @ ..] => (true, rest),
        _ => (false, rest),
    };
    let (namespace, resource, name, sub) = match rest {
        [] => return None,
        // A namespace's own subresources (`/api/v1/namespaces/<ns>/status`) look like a
        // namespaced collection; the apiserver knows they are not.
        ["namespaces", ns, sub @ ("status" | "finalize")] => {
            (None, "namespaces", Some(*ns), std::slice::from_ref(sub))
        }
        ["namespaces", ns, resource, tail @ ..] => {
            let (name, sub) = tail
                .split_first()
                .map_or((None, &[][..]), |(n, s)| (Some(*n), s));
            (Some(*ns), *resource, name, sub)
        }
        [resource, tail @ ..] => {
            let (name, sub) = tail
                .split_first()
                .map_or((None, &[][..]), |(n, s)| (Some(*n), s));
            (None, *resource, name, sub)
        }
    };
    let watch = legacy_watch || query.is_some_and(watch_requested);
    let verb = match method {
        "GET" | "HEAD" if watch => Verb::Watch,
        "GET" | "HEAD" if name.is_some() => Verb::Get,
        "GET" | "HEAD" => Verb::List,
        "POST" => Verb::Create,
        "PUT" => Verb::Update,
        "PATCH" => Verb::Patch,
        "DELETE" if name.is_some() => Verb::Delete,
        "DELETE" => Verb::DeleteCollection,
        _ => return None,
    };
    let resource = match sub {
        [] => resource.to_string(),
        sub => format!("{resource}/{}", sub.join("/")),
    };
    Some(ApiRequest {
        verb,
        resource,
        namespace: namespace.map(str::to_string),
        name: name.map(str::to_string),
    })
}

/// Whether the query asks for a watch: `watch` set to what Go's `strconv.ParseBool`
/// reads as true, as the apiserver parses it.
fn watch_requested(query: &str) -> bool {
    query.split('&').any(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        key == "watch" && matches!(value, "1" | "t" | "T" | "true" | "TRUE" | "True")
    })
}

/// The requests a fault rule takes: any of its (verb, resource) kinds, optionally only
/// on objects whose name starts with a prefix (the disk-lock Leases, not the heartbeat).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matcher {
    kinds: Vec<(Verb, String)>,
    name_prefix: Option<String>,
}

impl Matcher {
    /// Requests of `verb` on `resource` (`virtualmachinemigrations/status`).
    pub fn new(verb: Verb, resource: &str) -> Matcher {
        Matcher {
            kinds: vec![(verb, resource.to_string())],
            name_prefix: None,
        }
    }

    /// Each of `verbs` on `resource`.
    pub fn verbs(verbs: &[Verb], resource: &str) -> Matcher {
        Matcher {
            kinds: verbs.iter().map(|v| (*v, resource.to_string())).collect(),
            name_prefix: None,
        }
    }

    /// This matcher's requests and those of `verb` on `resource`.
    pub fn or(mut self, verb: Verb, resource: &str) -> Matcher {
        self.kinds.push((verb, resource.to_string()));
        self
    }

    /// Only requests on objects named `prefix...` (a create, which names no object in its
    /// path, is taken too).
    pub fn named(mut self, prefix: &str) -> Matcher {
        self.name_prefix = Some(prefix.to_string());
        self
    }

    /// Whether this matcher takes `request`.
    pub fn matches(&self, request: &ApiRequest) -> bool {
        let kind = self
            .kinds
            .iter()
            .any(|(verb, resource)| *verb == request.verb && *resource == request.resource);
        let named = match (&self.name_prefix, &request.name) {
            (None, _) => true,
            (Some(prefix), Some(name)) => name.starts_with(prefix.as_str()),
            (Some(_), None) => request.verb == Verb::Create,
        };
        kind && named
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kinds: Vec<String> = self.kinds.iter().map(|(v, r)| format!("{v} {r}")).collect();
        f.write_str(&kinds.join(" | "))?;
        if let Some(prefix) = &self.name_prefix {
            write!(f, " ({prefix}*)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verb_and_resource(method: &str, path: &str, query: Option<&str>) -> (Verb, String) {
        let r = classify(method, path, query).unwrap_or_else(|| panic!("{method} {path}"));
        (r.verb, r.resource)
    }

    #[test]
    fn verbs_come_from_the_method_the_name_and_watch() {
        let vmms = "/apis/ferry.dev/v1alpha1/namespaces/default/virtualmachinemigrations";
        let one = format!("{vmms}/m1");
        let r = "virtualmachinemigrations".to_string();
        assert_eq!(verb_and_resource("GET", &one, None), (Verb::Get, r.clone()));
        assert_eq!(
            verb_and_resource("GET", vmms, None),
            (Verb::List, r.clone())
        );
        assert_eq!(
            verb_and_resource("GET", vmms, Some("labelSelector=a%3Db&watch=true")),
            (Verb::Watch, r.clone())
        );
        assert_eq!(
            verb_and_resource("GET", vmms, Some("watch=1&resourceVersion=5")),
            (Verb::Watch, r.clone())
        );
        assert_eq!(
            verb_and_resource("GET", vmms, Some("watch=false")),
            (Verb::List, r.clone())
        );
        assert_eq!(
            verb_and_resource("GET", vmms, Some("allowWatchBookmarks=true")),
            (Verb::List, r.clone())
        );
        assert_eq!(
            verb_and_resource("POST", vmms, None),
            (Verb::Create, r.clone())
        );
        assert_eq!(
            verb_and_resource("PUT", &one, None),
            (Verb::Update, r.clone())
        );
        assert_eq!(
            verb_and_resource("PATCH", &one, None),
            (Verb::Patch, r.clone())
        );
        assert_eq!(
            verb_and_resource("DELETE", &one, None),
            (Verb::Delete, r.clone())
        );
        assert_eq!(
            verb_and_resource("DELETE", vmms, None),
            (Verb::DeleteCollection, r)
        );
        assert_eq!(classify("OPTIONS", &one, None), None);
    }

    #[test]
    fn subresources_namespaces_and_groups() {
        let status = classify(
            "PATCH",
            "/apis/ferry.dev/v1alpha1/namespaces/default/virtualmachines/demo/status",
            None,
        )
        .unwrap();
        assert_eq!(
            status,
            ApiRequest {
                verb: Verb::Patch,
                resource: "virtualmachines/status".into(),
                namespace: Some("default".into()),
                name: Some("demo".into()),
            }
        );
        let lease = classify(
            "PATCH",
            "/apis/coordination.k8s.io/v1/namespaces/ferry-system/leases/ferry-node-node-a",
            Some("fieldManager=ferry-agent-node-a&force=true"),
        )
        .unwrap();
        assert_eq!(
            (lease.verb, lease.resource.as_str()),
            (Verb::Patch, "leases")
        );
        assert_eq!(lease.namespace.as_deref(), Some("ferry-system"));
        // The core group, cluster-scoped objects, and a namespace's own subresources.
        assert_eq!(
            verb_and_resource("GET", "/api/v1/namespaces/default/configmaps/x", None),
            (Verb::Get, "configmaps".into())
        );
        assert_eq!(
            verb_and_resource("GET", "/api/v1/nodes/node-a", None),
            (Verb::Get, "nodes".into())
        );
        assert_eq!(
            verb_and_resource("GET", "/api/v1/namespaces/default", None),
            (Verb::Get, "namespaces".into())
        );
        assert_eq!(
            verb_and_resource("PUT", "/api/v1/namespaces/default/finalize", None),
            (Verb::Update, "namespaces/finalize".into())
        );
        assert_eq!(
            verb_and_resource("GET", "/api/v1/namespaces", Some("watch=true")),
            (Verb::Watch, "namespaces".into())
        );
        assert_eq!(
            verb_and_resource(
                "PUT",
                "/apis/certificates.k8s.io/v1/certificatesigningrequests/c1/approval",
                None
            ),
            (Verb::Update, "certificatesigningrequests/approval".into())
        );
        // The deprecated watch prefix.
        assert_eq!(
            verb_and_resource("GET", "/api/v1/watch/namespaces/default/pods", None),
            (Verb::Watch, "pods".into())
        );
    }

    #[test]
    fn what_is_not_a_resource_request() {
        for path in [
            "/version", "/healthz", "/readyz", "/api", "/api/v1", "/apis",
        ] {
            assert_eq!(classify("GET", path, None), None, "{path}");
        }
        assert_eq!(classify("GET", "/apis/ferry.dev/v1alpha1", None), None);
        assert_eq!(classify("GET", "/openapi/v3", None), None);
    }

    #[test]
    fn matchers_take_their_kinds_and_names_only() {
        let status = |verb, name: &str| ApiRequest {
            verb,
            resource: "virtualmachinemigrations/status".into(),
            namespace: Some("default".into()),
            name: Some(name.into()),
        };
        let m = Matcher::new(Verb::Patch, "virtualmachinemigrations/status");
        assert!(m.matches(&status(Verb::Patch, "m")));
        assert!(!m.matches(&status(Verb::Update, "m")));
        assert!(!m.matches(&status(Verb::Get, "m")));
        let main = ApiRequest {
            resource: "virtualmachinemigrations".into(),
            ..status(Verb::Patch, "m")
        };
        assert!(!m.matches(&main), "the main resource is not its status");
        let either = m
            .clone()
            .or(Verb::Update, "virtualmachinemigrations/status");
        assert!(either.matches(&status(Verb::Update, "m")));

        let lease = |verb, name: Option<&str>| ApiRequest {
            verb,
            resource: "leases".into(),
            namespace: Some("ferry-system".into()),
            name: name.map(str::to_string),
        };
        let disks = Matcher::verbs(&[Verb::Create, Verb::Patch, Verb::Delete], "leases")
            .named("ferry-disk-");
        assert!(disks.matches(&lease(Verb::Patch, Some("ferry-disk-default.demo.vda"))));
        assert!(!disks.matches(&lease(Verb::Patch, Some("ferry-node-node-a"))));
        assert!(disks.matches(&lease(Verb::Create, None)));
        assert!(!disks.matches(&lease(Verb::Get, Some("ferry-disk-default.demo.vda"))));
        assert_eq!(
            disks.to_string(),
            "create leases | patch leases | delete leases (ferry-disk-*)"
        );
    }
}
