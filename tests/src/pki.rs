//! The control plane's test PKI, written into its directory.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// Paths of the files the apiserver is started with, and the fault proxies' identity.
#[derive(Clone)]
pub struct Pki {
    /// CA that signed the serving certificate; clients trust it.
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    /// ServiceAccount token signing key pair.
    pub sa_key: PathBuf,
    pub sa_pub: PathBuf,
    /// The CA in PEM, for kubeconfigs.
    pub ca_pem: String,
    /// The fault proxies' serving certificate (127.0.0.1, localhost) and key, in PEM,
    /// signed by the same CA, so a component's kubeconfig trusts its proxy as it would
    /// the apiserver.
    pub proxy_cert_pem: String,
    pub proxy_key_pem: String,
    /// The front proxy (API aggregation): the CA extension API servers trust for the
    /// user headers, and the client certificate (CN [`FRONT_PROXY_CN`]) the apiserver
    /// shows them.
    pub front_proxy_ca: PathBuf,
    pub front_proxy_cert: PathBuf,
    pub front_proxy_key: PathBuf,
    /// The apiserver's client certificate for the kubelets (CN
    /// `kube-apiserver-kubelet-client`, group `system:masters`): logs, exec, port-forward.
    pub kubelet_client_cert: PathBuf,
    pub kubelet_client_key: PathBuf,
}

/// The CN of the apiserver's front-proxy client certificate (as kubeadm names it).
pub const FRONT_PROXY_CN: &str = "front-proxy-client";

/// Creates a CA, a serving certificate for 127.0.0.1, localhost and `extra_ips` (the
/// real nodes' view of the apiserver: its bridge address and the `kubernetes`
/// Service's ClusterIP), one for the fault proxies, the front proxy's, the kubelet
/// client's, and a ServiceAccount signing key pair (ECDSA P-256) in `dir`.
pub fn create(
    dir: &Path,
    extra_ips: &[std::net::IpAddr],
) -> Result<Pki, Box<dyn std::error::Error + Send + Sync>> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "ferry-test-ca");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let serving_key = KeyPair::generate()?;
    let mut names = vec![
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        "kubernetes.default.svc".to_string(),
    ];
    names.extend(extra_ips.iter().map(|ip| ip.to_string()));
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let serving = params.signed_by(&serving_key, &ca)?;

    let proxy_key = KeyPair::generate()?;
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    params
        .distinguished_name
        .push(DnType::CommonName, "ferry-api-fault-proxy");
    let proxy = params.signed_by(&proxy_key, &ca)?;

    let mut front_ca_params = CertificateParams::new(Vec::<String>::new())?;
    front_ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    front_ca_params
        .distinguished_name
        .push(DnType::CommonName, "ferry-test-front-proxy-ca");
    let front_ca = CertifiedIssuer::self_signed(front_ca_params, KeyPair::generate()?)?;
    let front_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, FRONT_PROXY_CN);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let front = params.signed_by(&front_key, &front_ca)?;

    let kubelet_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver-kubelet-client");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let kubelet_client = params.signed_by(&kubelet_key, &ca)?;

    let sa = KeyPair::generate()?;

    let pki = Pki {
        ca_cert: dir.join("ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        sa_key: dir.join("sa.key"),
        sa_pub: dir.join("sa.pub"),
        ca_pem: ca.pem(),
        proxy_cert_pem: proxy.pem(),
        proxy_key_pem: proxy_key.serialize_pem(),
        front_proxy_ca: dir.join("front-proxy-ca.crt"),
        front_proxy_cert: dir.join("front-proxy-client.crt"),
        front_proxy_key: dir.join("front-proxy-client.key"),
        kubelet_client_cert: dir.join("kubelet-client.crt"),
        kubelet_client_key: dir.join("kubelet-client.key"),
    };
    std::fs::write(&pki.kubelet_client_cert, kubelet_client.pem())?;
    std::fs::write(&pki.kubelet_client_key, kubelet_key.serialize_pem())?;
    std::fs::write(&pki.front_proxy_ca, front_ca.pem())?;
    std::fs::write(&pki.front_proxy_cert, front.pem())?;
    std::fs::write(&pki.front_proxy_key, front_key.serialize_pem())?;
    std::fs::write(&pki.ca_cert, &pki.ca_pem)?;
    std::fs::write(&pki.serving_cert, serving.pem())?;
    std::fs::write(&pki.serving_key, serving_key.serialize_pem())?;
    std::fs::write(&pki.sa_key, sa.serialize_pem())?;
    std::fs::write(&pki.sa_pub, sa.public_key_pem())?;
    Ok(pki)
}
