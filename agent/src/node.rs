//! This node's identity: a name, a stable host uuid kept in the state dir, the address
//! the target QEMU listens on for migration streams, the state dir itself, and the
//! storage roots the administrator allows host paths beneath.

use crate::cgroup::GuestCgroups;
use crate::qemu::QemuFeatures;
use crate::storage::StorageRoots;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use uuid::Uuid;

const HOST_UUID_FILE: &str = "host-uuid";

/// One agent's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The Kubernetes node name.
    pub name: String,
    /// Generated once and kept in `<state_dir>/host-uuid`; cookies carry it so a node
    /// can recognise (and refuse) a migration to itself.
    pub host_uuid: Uuid,
    /// Where incoming migration streams are accepted (`tcp:<address>:<port>`).
    pub address: IpAddr,
    /// Root of this agent's state: `host-uuid` and `vms/<key>/` per guest ([`guest_key`]).
    pub state_dir: PathBuf,
    /// Where host paths from specs may be (`--storage-root`); with none, a spec may
    /// name no host path at all (see [`crate::storage`]).
    pub storage: StorageRoots,
    /// Where each guest's own cgroup goes (`--guest-cgroup-parent`); `None`: QEMU stays
    /// in the cgroup of the process that starts it (the agent's tests of its library).
    pub cgroups: Option<GuestCgroups>,
    /// What the node's QEMU offers, probed at start ([`crate::qemu::probe`]); `None`:
    /// not probed (the library's tests), and policies are not checked against it.
    pub qemu: Option<QemuFeatures>,
}

impl Node {
    /// Opens (creating if needed) the state dir and loads or creates the host uuid. The
    /// node has no storage roots until [`with_storage`](Node::with_storage).
    pub fn open(state_dir: impl Into<PathBuf>, name: &str, address: IpAddr) -> io::Result<Node> {
        let state_dir = state_dir.into();
        std::fs::create_dir_all(state_dir.join("vms"))?;
        let host_uuid = load_or_create_host_uuid(&state_dir)?;
        Ok(Node {
            name: name.to_string(),
            host_uuid,
            address,
            state_dir,
            storage: StorageRoots::none(),
            cgroups: None,
            qemu: None,
        })
    }

    /// The node with the storage roots the administrator named.
    pub fn with_storage(self, storage: StorageRoots) -> Node {
        Node { storage, ..self }
    }

    /// The node whose guests run in cgroups of their own ([`crate::cgroup`]).
    pub fn with_cgroups(self, cgroups: GuestCgroups) -> Node {
        Node {
            cgroups: Some(cgroups),
            ..self
        }
    }

    /// The node whose QEMU offers `qemu`.
    pub fn with_qemu(self, qemu: QemuFeatures) -> Node {
        Node {
            qemu: Some(qemu),
            ..self
        }
    }

    /// The state dir of the guest keyed `vm` on this node ([`guest_key`]).
    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.state_dir.join("vms").join(vm)
    }
}

/// How much of the namespace and of the VM's name a [`guest_key`] shows.
const KEY_NAMESPACE: usize = 16;
const KEY_NAME: usize = 24;
/// Hex digits of the digest that makes a [`guest_key`] unique.
const KEY_DIGEST: usize = 16;

/// The key of the guest of VirtualMachine `namespace/vm` with domain uuid `uuid`: the
/// name of its state dir on a node, and how the supervisor and every phase name it.
///
/// The namespace is part of it, so a tenant's VM can never find, stop or save another
/// tenant's guest however it names its domain; so is the VM object's name (two VMs of one
/// namespace that share a definition are two guests); so is the uuid (a VM recreated
/// with another guest does not take over the old one's state). The key is bounded (a
/// QMP socket path must fit in a `sockaddr_un`): a readable, shortened
/// `<namespace>.<name>` and a digest of the three in full, e.g.
/// `default.demo-1f0c9a7e5d3b2a41`.
pub fn guest_key(namespace: &str, vm: &str, uuid: Uuid) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{namespace}/{vm}/{}", uuid.hyphenated()));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let cut = |s: &str, n: usize| s.chars().take(n).collect::<String>();
    format!(
        "{}.{}-{}",
        cut(namespace, KEY_NAMESPACE),
        cut(vm, KEY_NAME),
        &hex[..KEY_DIGEST]
    )
}

/// Whether `key` (a [`guest_key`]) may be one of a VM named `vm`, in any namespace: what
/// the key shows of the name matches. For tools and tests that look at a node's state
/// dirs; the agent itself always computes the key.
pub fn key_shows_vm(key: &str, vm: &str) -> bool {
    is_guest_key(key)
        && key
            .rsplit_once('-')
            .and_then(|(head, _)| head.split_once('.'))
            .is_some_and(|(_, name)| name == vm.chars().take(KEY_NAME).collect::<String>())
}

/// Whether a state dir's name has the form of a [`guest_key`] (a dir named otherwise —
/// one an older agent made — is never taken for a guest of some VM).
pub fn is_guest_key(name: &str) -> bool {
    name.rsplit_once('-').is_some_and(|(head, digest)| {
        head.contains('.')
            && digest.len() == KEY_DIGEST
            && digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

fn load_or_create_host_uuid(dir: &Path) -> io::Result<Uuid> {
    let path = dir.join(HOST_UUID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => Uuid::parse_str(s.trim()).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let uuid = Uuid::new_v4();
            write_atomic(&path, format!("{uuid}\n").as_bytes())?;
            Ok(uuid)
        }
        Err(e) => Err(e),
    }
}

/// Writes `data` to `path` through a temporary file and a rename, so a crash never
/// leaves a half-written file.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_uuid_is_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = Node::open(dir.path(), "a", "127.0.0.2".parse().unwrap()).unwrap();
        let b = Node::open(dir.path(), "a", "127.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(a.host_uuid, b.host_uuid);
        let other = tempfile::tempdir().unwrap();
        let c = Node::open(other.path(), "b", "127.0.0.3".parse().unwrap()).unwrap();
        assert_ne!(a.host_uuid, c.host_uuid);
        assert_eq!(a.vm_dir("g"), dir.path().join("vms/g"));
    }

    #[test]
    fn a_guest_key_names_namespace_vm_and_uuid() {
        let uuid: Uuid = "3c8f5b1e-8a0e-4f7c-9d2b-1a2b3c4d5e6f".parse().unwrap();
        let other: Uuid = "3c8f5b1e-8a0e-4f7c-9d2b-1a2b3c4d5e60".parse().unwrap();
        let key = guest_key("default", "demo", uuid);
        assert!(key.starts_with("default.demo-"), "{key}");
        assert!(
            is_guest_key(&key) && crate::domain::valid_vm_name(&key),
            "{key}"
        );
        assert!(key_shows_vm(&key, "demo") && !key_shows_vm(&key, "demo2"));
        let dashed = guest_key("default", "demo-2", uuid);
        assert!(key_shows_vm(&dashed, "demo-2") && !key_shows_vm(&dashed, "demo"));
        // Each of the three makes another guest.
        assert_ne!(key, guest_key("tenant-b", "demo", uuid));
        assert_ne!(key, guest_key("default", "demo2", uuid));
        assert_ne!(key, guest_key("default", "demo", other));
        // Stable: the same on every node and across agent restarts.
        assert_eq!(key, guest_key("default", "demo", uuid));
        // "a.b" / "c" and "a" / "b.c" are two VMs; the digest tells them apart.
        assert_ne!(guest_key("a", "b.c", uuid), guest_key("a.b", "c", uuid));
    }

    #[test]
    fn a_guest_key_is_bounded() {
        let uuid = Uuid::new_v4();
        let key = guest_key(&"n".repeat(63), &"v".repeat(253), uuid);
        assert!(
            key.len() <= 63 && crate::domain::valid_vm_name(&key),
            "{key}"
        );
        assert!(is_guest_key(&key));
    }

    #[test]
    fn an_older_agents_state_dir_is_not_a_guest_key() {
        for name in [
            "demo",
            "guest-1",
            "a.b-c",
            "default.demo-XYZ",
            "demo-0123456789abcdef",
        ] {
            assert!(!is_guest_key(name), "{name}");
        }
    }
}
