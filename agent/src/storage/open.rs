//! Opening a file beneath its root with `openat2(2)`.
//!
//! The root's directory is opened as the administrator wrote it; everything after it
//! (the namespace's directory, then the rest) is resolved by `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, relative to the
//! directory before it, with `O_CLOEXEC`, and with `O_NOFOLLOW` except on `O_PATH`
//! opens (there it would open a trailing link instead of refusing it).
//!
//! Opening a FIFO blocks until a writer comes and opening a device can act on it (a
//! watchdog starts counting), so a file is first resolved with `O_PATH`, which opens
//! nothing, and checked with `fstat` to be a regular file. Only then is it opened for
//! real (with `O_NONBLOCK | O_NOCTTY`, in case something else was put there in between),
//! and the two must be the same inode.

use super::UserPath;
use super::error::{FileKind, Rule, StorageError};
use super::lexical::{self, Located};
use super::roots::{Access, StorageRoots};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, OpenHow, ResolveFlag, fcntl, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// How many times a resolution interrupted by a concurrent rename (`EAGAIN`) is tried.
const ATTEMPTS: usize = 4;

/// A regular file opened beneath its root.
#[derive(Debug)]
pub struct Opened {
    fd: OwnedFd,
    path: String,
    field: String,
    access: Access,
}

impl Opened {
    /// The open file (`O_RDONLY` or `O_RDWR`, close-on-exec).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// The file's path: the root, the namespace's directory, the rest. It is the path
    /// the spec wrote, which has one spelling only.
    pub fn path(&self) -> &Path {
        Path::new(&self.path)
    }

    /// The field the path came from.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// How it was opened.
    pub fn access(&self) -> Access {
        self.access
    }

    pub(super) fn user_path(&self) -> UserPath<'_> {
        UserPath {
            field: &self.field,
            path: &self.path,
        }
    }
}

/// Opens the regular file `user.path` names beneath its root, for `namespace`, as
/// `want` says (read-write only beneath a read-write root).
pub fn open_beneath(
    roots: &StorageRoots,
    namespace: &str,
    user: UserPath<'_>,
    want: Access,
) -> Result<Opened, StorageError> {
    let refuse = |rule| StorageError::new(user, rule);
    let located = lexical::locate(roots, namespace, user.path, want).map_err(refuse)?;
    let base = open_base(&located).map_err(refuse)?;
    let fd = open_regular(base.as_fd(), &located.rest, want).map_err(refuse)?;
    Ok(Opened {
        fd,
        path: user.path.to_string(),
        field: user.field.to_string(),
        access: want,
    })
}

/// The directory `located.rest` is relative to: the root, or `<root>/<namespace>` for a
/// read-write root (resolved beneath the root, so it may not be a symbolic link). An
/// `O_PATH` fd, good as the directory of `openat2`.
pub(super) fn open_base(located: &Located<'_>) -> Result<OwnedFd, Rule> {
    let root = located.root.path();
    let dir = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|errno| Rule::RootUnavailable {
        root: root.to_path_buf(),
        errno,
    })?;
    match located.namespace_dir {
        None => Ok(dir),
        Some(namespace) => resolve(
            dir.as_fd(),
            Path::new(namespace),
            OFlag::O_PATH | OFlag::O_DIRECTORY,
            Mode::empty(),
        )
        .map_err(|errno| Rule::from_errno(errno, "opening the namespace's directory")),
    }
}

/// `openat2(dir, path)` with Ferry's resolve flags, `O_CLOEXEC` and, unless `flags`
/// has `O_PATH`, `O_NOFOLLOW`.
pub(super) fn resolve(
    dir: BorrowedFd<'_>,
    path: &Path,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    // RESOLVE_NO_SYMLINKS refuses every link, the last component's too (ELOOP);
    // O_NOFOLLOW says so again for the real opens. With O_PATH it would instead open a
    // trailing link itself.
    let nofollow = if flags.contains(OFlag::O_PATH) {
        OFlag::empty()
    } else {
        OFlag::O_NOFOLLOW
    };
    let how = OpenHow::new()
        .flags(flags | nofollow | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(
            ResolveFlag::RESOLVE_BENEATH
                | ResolveFlag::RESOLVE_NO_SYMLINKS
                | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        );
    let mut result = openat2(dir, path, how);
    for _ in 1..ATTEMPTS {
        // The kernel gives up a RESOLVE_BENEATH walk that raced a rename or mount.
        if !matches!(result, Err(Errno::EAGAIN)) {
            break;
        }
        result = openat2(dir, path, how);
    }
    result
}

/// Opens `path` beneath `dir` only if it is a regular file (see the module's doc).
fn open_regular(dir: BorrowedFd<'_>, path: &Path, want: Access) -> Result<OwnedFd, Rule> {
    let probe = resolve(dir, path, OFlag::O_PATH, Mode::empty())
        .map_err(|errno| Rule::from_errno(errno, "resolving"))?;
    let probed = stat(probe.as_fd())?;
    match kind(&probed) {
        None => {}
        Some(FileKind::Symlink) => return Err(Rule::SymbolicLink),
        Some(kind) => return Err(Rule::NotRegular(kind)),
    }
    let access = match want {
        Access::ReadOnly => OFlag::O_RDONLY,
        Access::ReadWrite => OFlag::O_RDWR,
    };
    let fd = resolve(
        dir,
        path,
        access | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(|errno| Rule::from_errno(errno, "opening"))?;
    let opened = stat(fd.as_fd())?;
    if (opened.st_dev, opened.st_ino) != (probed.st_dev, probed.st_ino) {
        return Err(Rule::Changed);
    }
    // O_NONBLOCK only guarded the open; on a regular file it means nothing, but QEMU
    // should get the file as an ordinary one.
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL).map_err(io("reading its flags"))?;
    let flags = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags)).map_err(io("setting its flags"))?;
    Ok(fd)
}

fn stat(fd: BorrowedFd<'_>) -> Result<FileStat, Rule> {
    fstat(fd).map_err(io("fstat"))
}

/// What the file is, if not a regular file.
pub(super) fn kind(st: &FileStat) -> Option<FileKind> {
    let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    match kind {
        SFlag::S_IFREG => None,
        SFlag::S_IFDIR => Some(FileKind::Directory),
        SFlag::S_IFIFO => Some(FileKind::Fifo),
        SFlag::S_IFSOCK => Some(FileKind::Socket),
        SFlag::S_IFCHR => Some(FileKind::CharDevice),
        SFlag::S_IFBLK => Some(FileKind::BlockDevice),
        SFlag::S_IFLNK => Some(FileKind::Symlink),
        _ => Some(FileKind::Unknown),
    }
}

pub(super) fn io(what: &'static str) -> impl Fn(Errno) -> Rule {
    move |errno| Rule::Io { what, errno }
}
