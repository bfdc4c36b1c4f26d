//! A new file for a save: written under a temporary name in its directory, linked into
//! place only when complete, never over an existing file.
//!
//! The directory is resolved beneath the root like any path ([`open_beneath`]'s rules;
//! a save needs a read-write root, so it lies in `<root>/<namespace>/`). The temporary
//! file, `.<name>.<pid>-<n>.partial` beside the final name, mode 0600, is created with
//! `O_CREAT | O_EXCL | O_NOFOLLOW`, so it is always a new file and never something
//! planted there. [`Finalize::commit`] renames it with `renameat2(RENAME_NOREPLACE)`,
//! which fails rather than replace a file that appeared meanwhile; a [`Finalize`]
//! dropped without a commit removes the temporary file. A process that dies before
//! either leaves it behind: the save phase records its name
//! ([`Finalize::temp_name`]) before the guest is touched, and whoever ends or retries
//! that migration removes it with [`remove_partial`].
//!
//! [`open_beneath`]: super::open_beneath

use super::UserPath;
use super::error::{Rule, StorageError};
use super::lexical;
use super::open::{io, open_base, resolve};
use super::roots::{Access, StorageRoots};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags, renameat2};
use nix::sys::stat::{Mode, fstatat};
use nix::unistd::{UnlinkatFlags, fsync, unlinkat};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Temporary names tried before giving up (each taken one is a leftover or a race).
const ATTEMPTS: u32 = 8;
/// Numbers the temporary files of this process.
static NEXT: AtomicU32 = AtomicU32::new(0);

/// The second half of [`create_save`]: links the written file into place.
#[derive(Debug)]
pub struct Finalize {
    /// The save's directory (`O_RDONLY | O_DIRECTORY`, for the rename and its fsync).
    dir: OwnedFd,
    temp: OsString,
    name: OsString,
    path: String,
    field: String,
    committed: bool,
}

/// Creates the temporary file for a save to `user.path` by `namespace`. The caller
/// writes (and fsyncs) the returned file, then calls [`Finalize::commit`].
pub fn create_save(
    roots: &StorageRoots,
    namespace: &str,
    user: UserPath<'_>,
) -> Result<(OwnedFd, Finalize), StorageError> {
    let refuse = |rule| StorageError::new(user, rule);
    let (dir, name) = save_dir(roots, namespace, user)?;
    // Early, for a clear message before a long save; the rename is what guarantees it.
    match fstatat(dir.as_fd(), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(_) => return Err(refuse(Rule::AlreadyExists)),
        Err(Errno::ENOENT) => {}
        Err(errno) => {
            return Err(refuse(Rule::Io {
                what: "looking for it",
                errno,
            }));
        }
    }
    let (file, temp) = create_temp(dir.as_fd(), &name).map_err(refuse)?;
    Ok((
        file,
        Finalize {
            dir,
            temp,
            name,
            path: user.path.to_string(),
            field: user.field.to_string(),
            committed: false,
        },
    ))
}

/// Removes `temp`, the temporary file a save to `user.path` by `namespace` created
/// ([`Finalize::temp_name`]) and a dead process left; whether it was there. Only a name
/// of that save's temporary files is removed, from the save's directory resolved
/// beneath the roots as [`create_save`] resolves it.
pub fn remove_partial(
    roots: &StorageRoots,
    namespace: &str,
    user: UserPath<'_>,
    temp: &str,
) -> Result<bool, StorageError> {
    let refuse = |rule| StorageError::new(user, rule);
    let (dir, name) = save_dir(roots, namespace, user)?;
    let prefix = format!(".{}.", name.to_string_lossy());
    if !(temp.starts_with(&prefix) && temp.ends_with(".partial") && !temp.contains('/')) {
        return Err(refuse(Rule::Io {
            what: "removing a temporary file not named like its own",
            errno: Errno::EINVAL,
        }));
    }
    match unlinkat(dir.as_fd(), temp, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => Ok(true),
        Err(Errno::ENOENT) => Ok(false),
        Err(errno) => Err(refuse(Rule::Io {
            what: "removing its temporary file",
            errno,
        })),
    }
}

/// The directory of a save to `user.path` by `namespace`, resolved beneath the roots
/// (`O_RDONLY | O_DIRECTORY`), and the save's file name.
fn save_dir(
    roots: &StorageRoots,
    namespace: &str,
    user: UserPath<'_>,
) -> Result<(OwnedFd, OsString), StorageError> {
    let refuse = |rule| StorageError::new(user, rule);
    let located =
        lexical::locate(roots, namespace, user.path, Access::ReadWrite).map_err(refuse)?;
    let (parent, name) = split(&located.rest);
    let base = open_base(&located)
        .map_err(directory_rule)
        .map_err(refuse)?;
    let dir = resolve(
        base.as_fd(),
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY,
        Mode::empty(),
    )
    .map_err(|errno| match errno {
        // O_DIRECTORY | O_NOFOLLOW on a symbolic link fails with ENOTDIR: say what it is.
        Errno::ENOTDIR if is_link(base.as_fd(), parent) => Rule::SymbolicLink,
        errno => directory_rule(Rule::from_errno(errno, "opening its directory")),
    })
    .map_err(refuse)?;
    Ok((dir, name.to_os_string()))
}

impl Finalize {
    /// Renames the temporary file to the save's name, unless that name exists by now,
    /// and fsyncs the directory. Returns the save's path.
    pub fn commit(mut self) -> Result<PathBuf, StorageError> {
        let user = UserPath {
            field: &self.field,
            path: &self.path,
        };
        renameat2(
            self.dir.as_fd(),
            self.temp.as_os_str(),
            self.dir.as_fd(),
            self.name.as_os_str(),
            RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|errno| StorageError::new(user, Rule::from_errno(errno, "renaming it")))?;
        self.committed = true;
        fsync(self.dir.as_fd())
            .map_err(io("syncing its directory"))
            .map_err(|rule| StorageError::new(user, rule))?;
        Ok(PathBuf::from(&self.path))
    }

    /// The save's final path.
    pub fn path(&self) -> &Path {
        Path::new(&self.path)
    }

    /// The temporary file's name (in the save's directory), for [`remove_partial`].
    pub fn temp_name(&self) -> String {
        self.temp.to_string_lossy().into_owned()
    }
}

impl Drop for Finalize {
    fn drop(&mut self) {
        if !self.committed {
            let _ = unlinkat(
                self.dir.as_fd(),
                self.temp.as_os_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// The directory part (`.` for none) and the file name of a located rest.
fn split(rest: &Path) -> (&Path, &OsStr) {
    let name = rest
        .file_name()
        .expect("a located rest is non-empty and has no '..'");
    let parent = match rest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    (parent, name)
}

/// Whether `path` beneath `dir` is a symbolic link, or beneath one: an `O_PATH`
/// resolution, which opens nothing, refuses it with `ELOOP`.
fn is_link(dir: BorrowedFd<'_>, path: &Path) -> bool {
    matches!(
        resolve(dir, path, OFlag::O_PATH, Mode::empty()),
        Err(Errno::ELOOP)
    )
}

/// For a missing directory, a rule that says so rather than "does not exist".
fn directory_rule(rule: Rule) -> Rule {
    match rule {
        Rule::NotFound => Rule::NoDirectory,
        rule => rule,
    }
}

fn create_temp(dir: BorrowedFd<'_>, name: &OsStr) -> Result<(OwnedFd, OsString), Rule> {
    for _ in 0..ATTEMPTS {
        let mut temp = OsString::from(".");
        temp.push(name);
        temp.push(format!(
            ".{}-{}.partial",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        match resolve(
            dir,
            Path::new(&temp),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL,
            Mode::from_bits_truncate(0o600),
        ) {
            Ok(fd) => return Ok((fd, temp)),
            Err(Errno::EEXIST) => continue,
            Err(errno) => return Err(Rule::from_errno(errno, "creating its temporary file")),
        }
    }
    Err(Rule::Io {
        what: "creating its temporary file",
        errno: Errno::EEXIST,
    })
}
