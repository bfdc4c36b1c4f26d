//! The storage roots an administrator names: `--storage-root <dir>=readWrite|readOnly`.

use super::error::Rule;
use super::lexical;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// How a root, or a request for a file beneath one, may use the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only. A read-only root is shared by every namespace (base images).
    ReadOnly,
    /// Read and write. A read-write root is per namespace: `<root>/<namespace>/`.
    ReadWrite,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::ReadOnly => "readOnly",
            Access::ReadWrite => "readWrite",
        })
    }
}

impl FromStr for Access {
    type Err = RootsError;

    /// The chart's spellings: `readOnly`, `readWrite`.
    fn from_str(s: &str) -> Result<Access, RootsError> {
        match s {
            "readOnly" => Ok(Access::ReadOnly),
            "readWrite" => Ok(Access::ReadWrite),
            _ => Err(RootsError::Access(s.to_string())),
        }
    }
}

/// A storage root the administrator named is not usable as one.
#[derive(Debug, thiserror::Error)]
pub enum RootsError {
    #[error("storage root {0:?}: expected <dir>=readWrite or <dir>=readOnly")]
    Syntax(String),
    #[error("storage root access {0:?}: expected readWrite or readOnly")]
    Access(String),
    #[error("storage root {path:?}: {rule}")]
    Path { path: String, rule: Rule },
    #[error("storage root /: a root must be a directory below /")]
    Slash,
    #[error("storage roots {0} and {1} overlap (one is inside the other)")]
    Overlap(PathBuf, PathBuf),
    #[error(
        "storage root {root} and the agent's state dir {state_dir} overlap: the state dir holds \
         the node's keys and the guests' sockets, which no spec may name"
    )]
    StateDir { root: PathBuf, state_dir: PathBuf },
}

/// One root: an absolute directory in canonical form, and its access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRoot {
    path: PathBuf,
    access: Access,
}

impl StorageRoot {
    /// A root at `path`, which must be absolute, canonical (as user paths must be: no
    /// `.`, `..`, doubled or trailing slash) and not `/`.
    pub fn new(path: &str, access: Access) -> Result<StorageRoot, RootsError> {
        if path == "/" {
            return Err(RootsError::Slash);
        }
        lexical::check_form(path).map_err(|rule| RootsError::Path {
            path: path.to_string(),
            rule,
        })?;
        Ok(StorageRoot {
            path: PathBuf::from(path),
            access,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn access(&self) -> Access {
        self.access
    }
}

impl FromStr for StorageRoot {
    type Err = RootsError;

    /// `<dir>=readWrite` or `<dir>=readOnly` (split at the last `=`).
    fn from_str(s: &str) -> Result<StorageRoot, RootsError> {
        let (path, access) = s
            .rsplit_once('=')
            .ok_or_else(|| RootsError::Syntax(s.to_string()))?;
        StorageRoot::new(path, access.parse()?)
    }
}

impl fmt::Display for StorageRoot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.path.display(), self.access)
    }
}

/// The node's storage roots, none inside another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRoots {
    roots: Vec<StorageRoot>,
}

impl StorageRoots {
    /// The roots, refused if one equals or lies inside another: every path then names at
    /// most one root, and a read-only root can never hold a read-write one.
    pub fn new(roots: Vec<StorageRoot>) -> Result<StorageRoots, RootsError> {
        for (i, a) in roots.iter().enumerate() {
            if let Some(b) = roots[i + 1..]
                .iter()
                .find(|b| a.path.starts_with(&b.path) || b.path.starts_with(&a.path))
            {
                return Err(RootsError::Overlap(a.path.clone(), b.path.clone()));
            }
        }
        Ok(StorageRoots { roots })
    }

    /// No roots: no spec may name a host path.
    pub fn none() -> StorageRoots {
        StorageRoots { roots: Vec::new() }
    }

    /// Refuses a root that is, contains or lies inside the agent's own state dir
    /// (compared as written, both absolute and canonical).
    pub fn check_apart_from(&self, state_dir: &Path) -> Result<(), RootsError> {
        match self
            .roots
            .iter()
            .find(|r| r.path.starts_with(state_dir) || state_dir.starts_with(&r.path))
        {
            Some(r) => Err(RootsError::StateDir {
                root: r.path.clone(),
                state_dir: state_dir.to_path_buf(),
            }),
            None => Ok(()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &StorageRoot> {
        self.roots.iter()
    }

    /// The root `path` lies beneath (or is), compared component by component.
    pub(super) fn containing(&self, path: &Path) -> Option<&StorageRoot> {
        self.roots.iter().find(|r| path.starts_with(&r.path))
    }
}

impl fmt::Display for StorageRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all: Vec<String> = self.roots.iter().map(|r| r.to_string()).collect();
        f.write_str(&all.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_command_line_form() {
        let r: StorageRoot = "/srv/images=readOnly".parse().unwrap();
        assert_eq!(r.path(), Path::new("/srv/images"));
        assert_eq!(r.access(), Access::ReadOnly);
        let r: StorageRoot = "/srv/a=b=readWrite".parse().unwrap();
        assert_eq!(r.path(), Path::new("/srv/a=b"));
        assert_eq!(r.access(), Access::ReadWrite);
        assert_eq!(r.to_string(), "/srv/a=b=readWrite");
    }

    #[test]
    fn refuses_bad_roots() {
        let err = |s: &str| s.parse::<StorageRoot>().unwrap_err().to_string();
        assert!(err("/srv/images").contains("expected <dir>=readWrite"));
        assert!(err("/srv/images=rw").contains("\"rw\": expected readWrite or readOnly"));
        assert!(err("/srv/images=ReadOnly").contains("expected readWrite or readOnly"));
        assert!(err("srv=readOnly").contains("not an absolute path"));
        assert!(err("/srv/../etc=readOnly").contains("'..'"));
        assert!(err("/srv//images=readOnly").contains("doubled"));
        assert!(err("/srv/images/=readOnly").contains("trailing"));
        assert!(err("/=readWrite").contains("below /"));
    }

    #[test]
    fn roots_may_not_overlap() {
        let root = |s: &str| s.parse::<StorageRoot>().unwrap();
        let err = StorageRoots::new(vec![
            root("/srv/images=readOnly"),
            root("/srv/images/tenants=readWrite"),
        ])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "storage roots /srv/images and /srv/images/tenants overlap (one is inside the other)"
        );
        assert!(
            StorageRoots::new(vec![root("/srv/a=readOnly"), root("/srv/a=readWrite")]).is_err()
        );
        // Component-wise: /srv/images2 is not inside /srv/images.
        let roots = StorageRoots::new(vec![
            root("/srv/images=readOnly"),
            root("/srv/images2=readWrite"),
        ])
        .unwrap();
        let found = roots.containing(Path::new("/srv/images2/a/b")).unwrap();
        assert_eq!(found.path(), Path::new("/srv/images2"));
        assert!(roots.containing(Path::new("/srv/other")).is_none());
    }

    #[test]
    fn roots_stay_apart_from_the_state_dir() {
        let root = |s: &str| s.parse::<StorageRoot>().unwrap();
        let roots = StorageRoots::new(vec![
            root("/var/lib/ferry-images=readOnly"),
            root("/var/lib/ferry-disks=readWrite"),
        ])
        .unwrap();
        assert!(roots.check_apart_from(Path::new("/var/lib/ferry")).is_ok());
        let inside = StorageRoots::new(vec![root("/var/lib/ferry/images=readOnly")]).unwrap();
        let err = inside
            .check_apart_from(Path::new("/var/lib/ferry"))
            .unwrap_err();
        assert!(err.to_string().starts_with(
            "storage root /var/lib/ferry/images and the agent's state dir /var/lib/ferry overlap"
        ));
        let around = StorageRoots::new(vec![root("/var/lib=readOnly")]).unwrap();
        assert!(
            around
                .check_apart_from(Path::new("/var/lib/ferry"))
                .is_err()
        );
    }
}
