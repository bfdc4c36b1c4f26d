//! Why a host path from a spec is refused.

use super::UserPath;
use nix::errno::Errno;
use std::fmt;
use std::path::PathBuf;

/// A host path the agent refused: where it came from, the path, and the rule it broke.
/// Its message reads `<field>: <path>: <rule>`, e.g.
/// `spec.toFile.path: /srv/saves/b/x.fsav: not under /srv/saves/a/ (the namespace's
/// directory of the read-write storage root /srv/saves)`.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {path}: {rule}")]
pub struct StorageError {
    /// The field the caller named, e.g. `spec.domainXML: <disk> vda <source file>`.
    pub field: String,
    /// The path as the spec wrote it.
    pub path: String,
    /// The rule broken.
    pub rule: Rule,
}

impl StorageError {
    pub(super) fn new(user: UserPath<'_>, rule: Rule) -> StorageError {
        StorageError {
            field: user.field.to_string(),
            path: user.path.to_string(),
            rule,
        }
    }
}

/// The rule a path, the file it names, or its contents broke.
#[derive(Debug, thiserror::Error)]
pub enum Rule {
    // The path's form (checked before anything is opened).
    #[error("contains a NUL byte")]
    Nul,
    #[error("not an absolute path")]
    NotAbsolute,
    #[error("has a '..' component")]
    ParentComponent,
    #[error("has a '.' component (write the path without it)")]
    CurrentComponent,
    #[error("has an empty component (a doubled or trailing slash; write the path without it)")]
    EmptyComponent,

    // Where it is, against the roots.
    #[error("the namespace {0:?} is not a DNS label")]
    BadNamespace(String),
    #[error("outside every storage root")]
    OutsideRoots,
    #[error("names the storage root {0} itself, not a file beneath it")]
    IsRoot(PathBuf),
    #[error("not under {dir}/ (the namespace's directory of the read-write storage root {root})")]
    NotUnderNamespace { root: PathBuf, dir: PathBuf },
    #[error("read-write under a read-only root ({0})")]
    ReadWriteUnderReadOnly(PathBuf),
    #[error(
        "a spec may not name an output file (serial and console output go to the VM's state dir)"
    )]
    OutputPath,

    // What the filesystem holds there.
    #[error("the storage root {root} cannot be opened: {errno}")]
    RootUnavailable { root: PathBuf, errno: Errno },
    #[error("a symbolic link, or beneath one (symbolic links are not followed)")]
    SymbolicLink,
    #[error("resolves outside its storage root")]
    Escapes,
    #[error("does not exist")]
    NotFound,
    #[error("its directory does not exist")]
    NoDirectory,
    #[error("a component of it is not a directory")]
    NotADirectory,
    #[error("{0}, not a regular file")]
    NotRegular(FileKind),
    #[error("changed while it was being opened")]
    Changed,
    #[error("already exists (a save never replaces a file)")]
    AlreadyExists,
    #[error("cannot be resolved safely: openat2(2) is missing (Linux 5.6 or newer is needed)")]
    NoOpenat2,
    #[error("{what}: {errno}")]
    Io { what: &'static str, errno: Errno },

    // The image's header.
    #[error("unknown disk format {0:?}")]
    UnknownFormat(String),
    #[error("declared raw but starts with a qcow2 header (refused: format confusion)")]
    Qcow2DeclaredRaw,
    #[error("declared qcow2 but has no qcow2 header")]
    NotQcow2,
    #[error("a qcow2 with a backing file{}", backing_name(.0))]
    BackingFile(Option<String>),
    #[error("a qcow2 with an external data file")]
    ExternalDataFile,
    #[error("a qcow2 of version {0} (versions 2 and 3 are supported)")]
    Qcow2Version(u32),
    #[error("a qcow2 header cut short ({0} bytes)")]
    TruncatedHeader(usize),
}

fn backing_name(name: &Option<String>) -> String {
    match name {
        Some(name) => format!(" ({name:?})"),
        None => String::new(),
    }
}

impl Rule {
    /// The rule an `openat2(2)` failure under Ferry's resolve flags stands for.
    pub(super) fn from_errno(errno: Errno, what: &'static str) -> Rule {
        match errno {
            // RESOLVE_NO_SYMLINKS (and O_NOFOLLOW on the last component).
            Errno::ELOOP => Rule::SymbolicLink,
            // RESOLVE_BENEATH: the resolution left the starting directory.
            Errno::EXDEV => Rule::Escapes,
            Errno::ENOENT => Rule::NotFound,
            Errno::ENOTDIR => Rule::NotADirectory,
            Errno::EEXIST => Rule::AlreadyExists,
            Errno::ENOSYS => Rule::NoOpenat2,
            errno => Rule::Io { what, errno },
        }
    }
}

/// What a path names when it is not a regular file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Directory,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Symlink,
    Unknown,
}

impl fmt::Display for FileKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FileKind::Directory => "a directory",
            FileKind::Fifo => "a FIFO",
            FileKind::Socket => "a socket",
            FileKind::CharDevice => "a character device",
            FileKind::BlockDevice => "a block device",
            FileKind::Symlink => "a symbolic link",
            FileKind::Unknown => "of an unknown file type",
        })
    }
}
