//! Who is asking for a console, and whether they may: without I/O.
//!
//! The apiserver proxies a console request to the operator with the caller's identity
//! in request headers (the front proxy, `--requestheader-*`), on a connection that shows
//! its front-proxy client certificate. Those headers are trusted only on such a
//! connection ([`FrontProxy`], read from the ConfigMap the apiserver publishes), and the
//! identity they carry is then checked with a SubjectAccessReview ([`review`]).

use std::collections::BTreeMap;

use ferry_crds::console::{GROUP, RESOURCE, SUBRESOURCE, VERB, VERSION};
use http::HeaderMap;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    APIGroup, APIGroupList, APIResource, APIResourceList, GroupVersionForDiscovery, Status,
};
use percent_encoding::percent_decode_str;

/// Where the apiserver publishes how it authenticates to extension API servers.
pub const AUTHENTICATION_CONFIGMAP: (&str, &str) =
    ("kube-system", "extension-apiserver-authentication");

/// The front proxy's settings, from the ConfigMap
/// `kube-system/extension-apiserver-authentication`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontProxy {
    /// CA (PEM) of the client certificate the apiserver shows when it proxies.
    pub client_ca: String,
    /// The certificate's CN must be one of these; empty: any the CA signed.
    pub allowed_names: Vec<String>,
    pub username_headers: Vec<String>,
    pub uid_headers: Vec<String>,
    pub group_headers: Vec<String>,
    pub extra_prefixes: Vec<String>,
}

/// Why the front proxy's settings or a request's identity are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error(
        "ConfigMap kube-system/extension-apiserver-authentication has no {0} \
         (is the apiserver started with --requestheader-client-ca-file?)"
    )]
    Missing(&'static str),
    #[error("ConfigMap kube-system/extension-apiserver-authentication, {key}: {message}")]
    Malformed { key: &'static str, message: String },
    #[error("the front proxy's certificate CN '{0}' is not among --requestheader-allowed-names")]
    NotAllowed(String),
    #[error("the request names no user (headers {0:?})")]
    NoUser(Vec<String>),
}

impl FrontProxy {
    /// Reads the ConfigMap's data.
    pub fn from_configmap(data: &BTreeMap<String, String>) -> Result<FrontProxy, AccessError> {
        let list = |key: &'static str| -> Result<Vec<String>, AccessError> {
            match data.get(key) {
                None => Ok(Vec::new()),
                Some(s) if s.trim().is_empty() => Ok(Vec::new()),
                Some(s) => serde_json::from_str(s).map_err(|e| AccessError::Malformed {
                    key,
                    message: format!("not a JSON list of strings: {e}"),
                }),
            }
        };
        let client_ca = data
            .get("requestheader-client-ca-file")
            .filter(|s| !s.trim().is_empty())
            .cloned()
            .ok_or(AccessError::Missing("requestheader-client-ca-file"))?;
        let username_headers = list("requestheader-username-headers")?;
        if username_headers.is_empty() {
            return Err(AccessError::Missing("requestheader-username-headers"));
        }
        Ok(FrontProxy {
            client_ca,
            allowed_names: list("requestheader-allowed-names")?,
            username_headers,
            uid_headers: list("requestheader-uid-headers")?,
            group_headers: list("requestheader-group-headers")?,
            extra_prefixes: list("requestheader-extra-headers-prefix")?,
        })
    }

    /// Whether a front-proxy certificate with subject CN `cn` may speak for users.
    pub fn allows(&self, cn: Option<&str>) -> Result<(), AccessError> {
        if self.allowed_names.is_empty() {
            return Ok(());
        }
        match cn {
            Some(cn) if self.allowed_names.iter().any(|n| n == cn) => Ok(()),
            other => Err(AccessError::NotAllowed(other.unwrap_or("").to_string())),
        }
    }

    /// The caller the apiserver names in `headers`.
    pub fn user(&self, headers: &HeaderMap) -> Result<User, AccessError> {
        let first = |names: &[String]| {
            names.iter().find_map(|h| {
                headers
                    .get(h.as_str())
                    .and_then(|v| v.to_str().ok())
                    .filter(|v| !v.is_empty())
                    .map(str::to_string)
            })
        };
        let name = first(&self.username_headers)
            .ok_or(AccessError::NoUser(self.username_headers.clone()))?;
        let uid = first(&self.uid_headers);
        let mut groups = Vec::new();
        for h in &self.group_headers {
            for v in headers.get_all(h.as_str()) {
                if let Ok(v) = v.to_str() {
                    groups.push(v.to_string());
                }
            }
        }
        let mut extra: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (header, value) in headers {
            let header = header.as_str();
            for prefix in &self.extra_prefixes {
                let prefix = prefix.to_ascii_lowercase();
                let Some(key) = header.strip_prefix(&prefix) else {
                    continue;
                };
                let key = percent_decode_str(key).decode_utf8_lossy().to_lowercase();
                if let Ok(v) = value.to_str() {
                    extra.entry(key).or_default().push(v.to_string());
                }
            }
        }
        Ok(User {
            name,
            uid,
            groups,
            extra,
        })
    }
}

/// A caller as the apiserver authenticated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: Option<String>,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The question put to the apiserver: may `user` `get` `virtualmachines/console` of
/// the console group on VM `namespace/vm`?
pub fn review(user: &User, namespace: &str, vm: &str) -> SubjectAccessReview {
    SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.name.clone()),
            uid: user.uid.clone(),
            groups: Some(user.groups.clone()),
            extra: (!user.extra.is_empty()).then(|| user.extra.clone()),
            resource_attributes: Some(ResourceAttributes {
                group: Some(GROUP.into()),
                version: Some(VERSION.into()),
                resource: Some(RESOURCE.into()),
                subresource: Some(SUBRESOURCE.into()),
                verb: Some(VERB.into()),
                namespace: Some(namespace.into()),
                name: Some(vm.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The refusal of a reviewed request, as the apiserver words its own.
pub fn forbidden(user: &User, namespace: &str, vm: &str, reason: Option<&str>) -> Status {
    let why = reason
        .filter(|r| !r.is_empty())
        .map(|r| format!(": {r}"))
        .unwrap_or_default();
    status(
        403,
        "Forbidden",
        format!(
            "{RESOURCE}.{GROUP} \"{vm}\" is forbidden: User \"{}\" cannot {VERB} resource \
             \"{RESOURCE}/{SUBRESOURCE}\" in API group \"{GROUP}\" in the namespace \
             \"{namespace}\"{why}",
            user.name
        ),
    )
}

/// A `metav1.Status` of a failure.
pub fn status(code: u16, reason: &str, message: String) -> Status {
    Status {
        code: Some(code.into()),
        message: Some(message),
        reason: Some(reason.into()),
        status: Some("Failure".into()),
        ..Default::default()
    }
}

/// The discovery documents of the console group: `/apis`, `/apis/<group>` and
/// `/apis/<group>/<version>`.
pub fn group() -> APIGroup {
    let version = GroupVersionForDiscovery {
        group_version: format!("{GROUP}/{VERSION}"),
        version: VERSION.into(),
    };
    APIGroup {
        name: GROUP.into(),
        preferred_version: Some(version.clone()),
        versions: vec![version],
        server_address_by_client_cidrs: None,
    }
}

pub fn groups() -> APIGroupList {
    APIGroupList {
        groups: vec![group()],
    }
}

pub fn resources() -> APIResourceList {
    APIResourceList {
        group_version: format!("{GROUP}/{VERSION}"),
        resources: vec![APIResource {
            name: format!("{RESOURCE}/{SUBRESOURCE}"),
            namespaced: true,
            kind: "VirtualMachineConsole".into(),
            verbs: vec![VERB.into()],
            singular_name: String::new(),
            ..Default::default()
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn configmap() -> BTreeMap<String, String> {
        BTreeMap::from([
            (
                "requestheader-client-ca-file".into(),
                "-----BEGIN CERTIFICATE-----".into(),
            ),
            (
                "requestheader-allowed-names".into(),
                r#"["front-proxy-client"]"#.into(),
            ),
            (
                "requestheader-username-headers".into(),
                r#"["X-Remote-User"]"#.into(),
            ),
            (
                "requestheader-uid-headers".into(),
                r#"["X-Remote-Uid"]"#.into(),
            ),
            (
                "requestheader-group-headers".into(),
                r#"["X-Remote-Group"]"#.into(),
            ),
            (
                "requestheader-extra-headers-prefix".into(),
                r#"["X-Remote-Extra-"]"#.into(),
            ),
        ])
    }

    #[test]
    fn the_configmap_gives_the_front_proxy() {
        let p = FrontProxy::from_configmap(&configmap()).unwrap();
        assert_eq!(p.allowed_names, ["front-proxy-client"]);
        assert_eq!(p.username_headers, ["X-Remote-User"]);
        let mut no_ca = configmap();
        no_ca.remove("requestheader-client-ca-file");
        let e = FrontProxy::from_configmap(&no_ca).unwrap_err();
        assert!(
            e.to_string().contains("no requestheader-client-ca-file"),
            "{e}"
        );
        let mut bad = configmap();
        bad.insert(
            "requestheader-group-headers".into(),
            "X-Remote-Group".into(),
        );
        let e = FrontProxy::from_configmap(&bad).unwrap_err();
        assert!(
            e.to_string()
                .contains("requestheader-group-headers: not a JSON list"),
            "{e}"
        );
    }

    #[test]
    fn only_an_allowed_front_proxy_speaks_for_users() {
        let p = FrontProxy::from_configmap(&configmap()).unwrap();
        assert!(p.allows(Some("front-proxy-client")).is_ok());
        assert_eq!(
            p.allows(Some("node-a")),
            Err(AccessError::NotAllowed("node-a".into()))
        );
        assert!(p.allows(None).is_err());
        let any = FrontProxy {
            allowed_names: vec![],
            ..p
        };
        assert!(any.allows(Some("whoever")).is_ok());
    }

    #[test]
    fn the_user_groups_and_extras_come_from_the_headers() {
        let p = FrontProxy::from_configmap(&configmap()).unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "x-remote-user",
            HeaderValue::from_static("system:serviceaccount:t:alice"),
        );
        h.insert("x-remote-uid", HeaderValue::from_static("1234"));
        h.append(
            "x-remote-group",
            HeaderValue::from_static("system:serviceaccounts"),
        );
        h.append(
            "x-remote-group",
            HeaderValue::from_static("system:authenticated"),
        );
        h.append(
            "x-remote-extra-authentication.kubernetes.io%2fpod-name",
            HeaderValue::from_static("p"),
        );
        let u = p.user(&h).unwrap();
        assert_eq!(u.name, "system:serviceaccount:t:alice");
        assert_eq!(u.uid.as_deref(), Some("1234"));
        assert_eq!(u.groups, ["system:serviceaccounts", "system:authenticated"]);
        assert_eq!(u.extra["authentication.kubernetes.io/pod-name"], ["p"]);
        assert!(matches!(
            p.user(&HeaderMap::new()),
            Err(AccessError::NoUser(_))
        ));
    }

    #[test]
    fn the_review_asks_for_the_console_subresource_of_that_vm() {
        let u = User {
            name: "alice".into(),
            uid: None,
            groups: vec!["devs".into()],
            extra: BTreeMap::new(),
        };
        let r = review(&u, "tenant-a", "web");
        let a = r.spec.resource_attributes.unwrap();
        assert_eq!(a.group.as_deref(), Some("subresources.ferry.dev"));
        assert_eq!(a.resource.as_deref(), Some("virtualmachines"));
        assert_eq!(a.subresource.as_deref(), Some("console"));
        assert_eq!(a.verb.as_deref(), Some("get"));
        assert_eq!(
            (a.namespace.as_deref(), a.name.as_deref()),
            (Some("tenant-a"), Some("web"))
        );
        assert_eq!(r.spec.user.as_deref(), Some("alice"));
        assert!(r.spec.extra.is_none());
        let f = forbidden(&u, "tenant-a", "web", None);
        assert_eq!(f.code, Some(403));
        assert!(
            f.message
                .unwrap()
                .contains("User \"alice\" cannot get resource \"virtualmachines/console\"")
        );
    }

    #[test]
    fn discovery_lists_the_console_subresource() {
        let r = resources();
        assert_eq!(r.group_version, "subresources.ferry.dev/v1alpha1");
        assert_eq!(r.resources[0].name, "virtualmachines/console");
        assert_eq!(groups().groups[0].name, "subresources.ferry.dev");
    }
}
