//! Host paths from a spec, opened only beneath the storage roots an administrator named
//! (issue 15, "Tenant-safe nodes").
//!
//! A user who may create a VirtualMachine names host paths in it: disk sources, saves
//! (`spec.toFile.path`), restores (`spec.restoreFrom`). The agent runs as root, so each
//! such path must be one the administrator allowed, for that user's namespace:
//!
//! - [`StorageRoots`]: the node's roots, each a directory with an [`Access`]
//!   (`--storage-root <dir>=readWrite|readOnly`, repeatable; chart value `agent.storage`).
//!   A read-only root (base images) is shared by every namespace, read-only. A
//!   read-write root is per tenant: namespace `ns` may use it only under `<root>/<ns>/`.
//!   Roots may not overlap (one inside another), so every path names at most one root.
//! - [`open_beneath`]: checks the path's form and finds its root lexically (below), then
//!   opens the root directory, `<ns>` under it for a read-write root, and the rest with
//!   `openat2(2)` and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`:
//!   no component may be a symbolic link (one that points inside the root is refused
//!   too), and nothing resolves outside the directory it started from. Only a regular
//!   file is opened: FIFOs, sockets, devices and directories are refused after an
//!   `O_PATH` resolution, which opens nothing. The result is an owned fd ([`Opened`]).
//! - [`check_image`]: the disk image's header against its declared [`ImageFormat`]: a
//!   qcow2 that names a backing file or an external data file (QEMU would open that
//!   path itself) is refused, and so is a file whose header disagrees with its
//!   declared format (a raw disk that starts with a qcow2 header: format confusion).
//! - [`open_guest`]: every host file a guest's definition names, opened for its start.
//! - [`create_save`]: a new file for a save, created under a temporary name with
//!   `O_EXCL | O_NOFOLLOW` in its directory (resolved as above) and linked into place by
//!   [`Finalize::commit`] with `renameat2(RENAME_NOREPLACE)`: an existing file is never
//!   replaced.
//!
//! Every refusal is a [`StorageError`]: the field the path came from (the caller names
//! it, e.g. `spec.domainXML: <disk> vda <source file>`), the path, and the [`Rule`] it
//! broke.
//!
//! # The path's form
//! A path must be absolute and in canonical form: no `..` or `.` component, no doubled or
//! trailing slash, no NUL byte. Non-canonical spellings are refused rather than
//! normalised, so the path a spec names is exactly the path opened and reported, and one
//! file has one spelling. The lexical checks only pick the root and give clear messages;
//! `openat2` is what keeps the open beneath it.
//!
//! The roots themselves are the administrator's and trusted: a root's own path is opened
//! with `open(2)` as written (a symbolic link in it is followed); only what lies beneath
//! a root comes from a user. What only someone with access to the host can put beneath
//! a root is not judged either: a mount point is crossed (no `RESOLVE_NO_XDEV`), and a
//! hard link to a file elsewhere on the same filesystem is an ordinary file.
//!
//! # Where it is used
//! Every host path of a spec goes through here: [`open_guest`] at every VM start (first
//! starts, Prepare on a target, restores; QEMU inherits the descriptors through
//! `-add-fd` and opens `/dev/fdset/N`, see [`crate::cmdline`]), [`create_save`] for a
//! migration to a file, [`open_beneath`] for a restore's state file. A node without
//! roots ([`StorageRoots::none`]) lets no spec name a host path.

mod error;
mod guest;
mod image;
mod lexical;
mod open;
mod roots;
mod save;

pub use error::{FileKind, Rule, StorageError};
pub use guest::{DiskFile, GuestFiles, Owner, open_guest};
pub use image::{HEADER_READ, ImageFormat, UnknownFormat, check_header, check_image};
pub use open::{Opened, open_beneath};
pub use roots::{Access, RootsError, StorageRoot, StorageRoots};
pub use save::{Finalize, create_save, remove_partial};

/// The name of the disk-lock Lease of the image at `path` (a disk's `<source file>`):
/// `ferry-disk-` and 20 hex digits of its SHA-256. One lock per image file, so no two
/// VMs ever write one image, whichever VM or disk names it: a path has one spelling
/// (canonical form is enforced, not normalised: see above) and no symbolic link is
/// followed, so two guests name one image only by one path — on every node, as long
/// as the nodes mount shared storage at the same path, as the chart's roots do.
pub fn image_lock_name(path: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(path.as_bytes());
    let hex: String = digest.iter().take(10).map(|b| format!("{b:02x}")).collect();
    format!("ferry-disk-{hex}")
}

/// A host path as a spec wrote it, and the field it came from (for messages).
#[derive(Debug, Clone, Copy)]
pub struct UserPath<'a> {
    /// Where the path was found, e.g. `spec.toFile.path` or
    /// `spec.domainXML: <disk> vda <source file>`.
    pub field: &'a str,
    /// The path, as written.
    pub path: &'a str,
}

#[cfg(test)]
mod lock_name_tests {
    use super::image_lock_name;

    #[test]
    fn one_lock_name_per_image_path() {
        let a = image_lock_name("/var/lib/ferry-disks/default/a.img");
        assert_eq!(a, image_lock_name("/var/lib/ferry-disks/default/a.img"));
        assert_ne!(a, image_lock_name("/var/lib/ferry-disks/default/b.img"));
        assert_ne!(a, image_lock_name("/var/lib/ferry-disks/team-b/a.img"));
        // A Lease name: a DNS subdomain, the prefix the admission policy allows.
        assert!(a.starts_with("ferry-disk-") && a.len() == 31, "{a}");
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        );
    }
}
