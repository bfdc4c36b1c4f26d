//! This node's identity: a name, a stable host uuid kept in the state dir, the address
//! the target QEMU listens on for migration streams, the state dir itself, and the
//! storage roots the administrator allows host paths beneath.

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
    /// Root of this agent's state: `host-uuid` and `vms/<name>/` per VM.
    pub state_dir: PathBuf,
    /// Where host paths from specs may be (`--storage-root`); with none, a spec may
    /// name no host path at all (see [`crate::storage`]).
    pub storage: StorageRoots,
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
        })
    }

    /// The node with the storage roots the administrator named.
    pub fn with_storage(self, storage: StorageRoots) -> Node {
        Node { storage, ..self }
    }

    /// The state dir of VM `vm` on this node (the name is validated by the domain parser).
    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.state_dir.join("vms").join(vm)
    }
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
}
