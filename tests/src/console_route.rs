//! How the simulated cluster routes the console API (an aggregated API) to the operator,
//! which runs as a host process, not as a Pod behind the chart's Service.
//!
//! SIMULATED ROUTING: the chart's Service `ferry-console` selects the operator's Pods;
//! here there are none and no kube-proxy. The harness turns that Service into an
//! `ExternalName` of `localhost` and sets the APIService's port to the operator's
//! console port, so the apiserver's aggregator dials `localhost:<port>` (it resolves an
//! ExternalName Service to its name and the APIService's port) with the TLS server name
//! `ferry-console.ferry-system.svc`, as it would dial the Service on a real cluster.
//! Everything else is the chart's: the APIService, its `caBundle` (the operator
//! injects it), RBAC, and the apiserver's own authentication and front-proxy headers.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::Api;
use kube::api::{Patch, PatchParams};

use crate::HarnessError;
use crate::cluster::NAMESPACE;

/// The chart's console Service (release `ferry`).
pub const SERVICE: &str = "ferry-console";

/// Points the chart's console APIService at `localhost:<port>`; `false` when the chart
/// has no console (`console.enabled=false`).
pub async fn route(admin: &kube::Client, port: u16) -> Result<bool, HarnessError> {
    let api_services: Api<APIService> = Api::all(admin.clone());
    let name = ferry_crds::console::API_SERVICE;
    let setup = |what: &str, e: kube::Error| HarnessError::Setup(format!("{what}: {e}"));
    if api_services
        .get_opt(name)
        .await
        .map_err(|e| setup("reading the console APIService", e))?
        .is_none()
    {
        return Ok(false);
    }
    let services: Api<Service> = Api::namespaced(admin.clone(), NAMESPACE);
    // A merge patch: the nulls clear what a ClusterIP Service has and an ExternalName
    // one may not.
    let external = serde_json::json!({ "spec": {
        "type": "ExternalName", "externalName": "localhost", "selector": null,
        "clusterIP": null, "clusterIPs": null, "ipFamilies": null, "ipFamilyPolicy": null,
        "internalTrafficPolicy": null,
    }});
    services
        .patch(SERVICE, &PatchParams::default(), &Patch::Merge(&external))
        .await
        .map_err(|e| setup("making the console Service an ExternalName", e))?;
    let port = serde_json::json!({ "spec": { "service": { "port": port } } });
    api_services
        .patch(name, &PatchParams::default(), &Patch::Merge(&port))
        .await
        .map_err(|e| setup("setting the console APIService's port", e))?;
    Ok(true)
}
