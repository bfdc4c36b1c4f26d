//! Arguments → the objects and patches the plugin sends (pure).

use serde_json::{Value, json};

/// What `kubectl ferry migrate` asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MigrateArgs {
    pub vm: String,
    pub to: Option<String>,
    pub preset: Option<String>,
    pub bandwidth_mibps: Option<i64>,
    pub max_downtime_ms: Option<i64>,
    /// `spec.transport.tls`; None leaves the API's default.
    pub tls: Option<bool>,
    /// `spec.mode: PeerToPeer`: the source agent drives the phases.
    pub peer_to_peer: bool,
}

/// A VirtualMachineMigration for `args`, with a generated name (`<vm>-xxxxx`).
pub fn migration(args: &MigrateArgs) -> Value {
    let mut spec = json!({"vmName": args.vm});
    if let Some(to) = &args.to {
        spec["targetNode"] = json!(to);
    }
    let mut policy = serde_json::Map::new();
    if let Some(p) = &args.preset {
        policy.insert("preset".into(), json!(p));
    }
    if let Some(b) = args.bandwidth_mibps {
        policy.insert("bandwidthMiBps".into(), json!(b));
    }
    if let Some(d) = args.max_downtime_ms {
        policy.insert("maxDowntimeMs".into(), json!(d));
    }
    if !policy.is_empty() {
        spec["policy"] = Value::Object(policy);
    }
    if let Some(tls) = args.tls {
        spec["transport"] = json!({"tls": tls});
    }
    if args.peer_to_peer {
        spec["mode"] = json!("PeerToPeer");
    }
    object(&format!("{}-", args.vm), spec)
}

/// How `kubectl ferry save` compresses the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
}

impl Compression {
    /// The API's spelling.
    pub fn api(self) -> &'static str {
        match self {
            Compression::None => "None",
            Compression::Gzip => "Gzip",
            Compression::Zstd => "Zstd",
            Compression::Xz => "Xz",
        }
    }
}

/// A VirtualMachineMigration that saves `vm` to a file: `spec.toFile`.
pub fn save(vm: &str, path: &str, compression: Compression, tls: Option<bool>) -> Value {
    let mut spec = json!({
        "vmName": vm,
        "toFile": {"path": path, "compression": compression.api()},
    });
    if let Some(tls) = tls {
        spec["transport"] = json!({"tls": tls});
    }
    object(&format!("{vm}-save-"), spec)
}

fn object(generate_name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "ferry.dev/v1alpha1",
        "kind": "VirtualMachineMigration",
        "metadata": {"generateName": generate_name},
        "spec": spec,
    })
}

/// The merge patch that restores a VM from a saved file, optionally on `node`.
pub fn restore_patch(path: &str, node: Option<&str>) -> Value {
    let mut spec = json!({"restoreFrom": path});
    if let Some(n) = node {
        spec["nodeName"] = json!(n);
    }
    json!({"spec": spec})
}

/// The merge patch that cancels a migration.
pub fn cancel_patch() -> Value {
    json!({"spec": {"cancel": true}})
}

/// The merge patch that cordons a node, as `kubectl cordon` does.
pub fn cordon_patch() -> Value {
    json!({"spec": {"unschedulable": true}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_migrate_names_only_the_vm() {
        let m = migration(&MigrateArgs {
            vm: "demo".into(),
            ..Default::default()
        });
        assert_eq!(m["metadata"]["generateName"], "demo-");
        assert_eq!(m["spec"], json!({"vmName": "demo"}));
        assert_eq!(m["kind"], "VirtualMachineMigration");
    }

    #[test]
    fn migrate_flags_become_spec_fields() {
        let m = migration(&MigrateArgs {
            vm: "demo".into(),
            to: Some("node-b".into()),
            preset: Some("Safest".into()),
            bandwidth_mibps: Some(8),
            max_downtime_ms: Some(300),
            tls: Some(false),
            peer_to_peer: true,
        });
        assert_eq!(
            m["spec"],
            json!({
                "vmName": "demo",
                "targetNode": "node-b",
                "policy": {"preset": "Safest", "bandwidthMiBps": 8, "maxDowntimeMs": 300},
                "transport": {"tls": false},
                "mode": "PeerToPeer"
            })
        );
        // It parses as the API type (the fields exist, spelled right).
        let typed: ferry_crds::VirtualMachineMigration = serde_json::from_value(m).unwrap();
        assert_eq!(typed.spec.target_node.as_deref(), Some("node-b"));
        assert_eq!(typed.spec.policy.bandwidth_mi_bps, Some(8));
        assert!(!typed.spec.transport.tls);
    }

    #[test]
    fn save_and_restore_write_the_file_fields() {
        let s = save(
            "demo",
            "/var/lib/ferry/saves/demo.img",
            Compression::Zstd,
            None,
        );
        assert_eq!(s["metadata"]["generateName"], "demo-save-");
        assert_eq!(
            s["spec"]["toFile"],
            json!({"path": "/var/lib/ferry/saves/demo.img", "compression": "Zstd"})
        );
        assert_eq!(Compression::None.api(), "None");
        assert_eq!(Compression::Xz.api(), "Xz");
        assert_eq!(
            restore_patch("/saves/demo.img", Some("node-b")),
            json!({"spec": {"restoreFrom": "/saves/demo.img", "nodeName": "node-b"}})
        );
        assert_eq!(
            restore_patch("/saves/demo.img", None),
            json!({"spec": {"restoreFrom": "/saves/demo.img"}})
        );
    }
}
