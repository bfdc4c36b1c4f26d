//! The lexical half of resolving a path: its form, and which root and directory beneath
//! it the path names. Nothing here touches the filesystem.

use super::error::Rule;
use super::roots::{Access, StorageRoot, StorageRoots};
use std::path::{Path, PathBuf};

/// A path located beneath a root, not yet opened.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Located<'r> {
    pub root: &'r StorageRoot,
    /// The namespace's directory under a read-write root (`<root>/<namespace>`); `None`
    /// under a read-only root.
    pub namespace_dir: Option<&'r str>,
    /// The rest, relative to `<root>` or `<root>/<namespace>`; never empty.
    pub rest: PathBuf,
}

/// Checks a path's form: absolute, no NUL, and canonical (no `..`, `.` or empty
/// component). `/` itself passes.
pub(super) fn check_form(path: &str) -> Result<(), Rule> {
    if path.contains('\0') {
        return Err(Rule::Nul);
    }
    let Some(relative) = path.strip_prefix('/') else {
        return Err(Rule::NotAbsolute);
    };
    if relative.is_empty() {
        return Ok(());
    }
    for component in relative.split('/') {
        match component {
            "" => return Err(Rule::EmptyComponent),
            "." => return Err(Rule::CurrentComponent),
            ".." => return Err(Rule::ParentComponent),
            _ => {}
        }
    }
    Ok(())
}

/// A Kubernetes namespace name: an RFC 1123 label.
fn is_dns_label(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&s.len())
        && s.chars().all(|c| alnum(c) || c == '-')
        && s.starts_with(alnum)
        && s.ends_with(alnum)
}

/// Finds the root `path` names and checks `namespace` may use it as `want` says.
pub(super) fn locate<'r>(
    roots: &'r StorageRoots,
    namespace: &'r str,
    path: &str,
    want: Access,
) -> Result<Located<'r>, Rule> {
    check_form(path)?;
    if !is_dns_label(namespace) {
        return Err(Rule::BadNamespace(namespace.to_string()));
    }
    let path = Path::new(path);
    let root = roots.containing(path).ok_or(Rule::OutsideRoots)?;
    if root.access() == Access::ReadOnly && want == Access::ReadWrite {
        return Err(Rule::ReadWriteUnderReadOnly(root.path().to_path_buf()));
    }
    let below = path
        .strip_prefix(root.path())
        .expect("containing() compared the prefix");
    if below.as_os_str().is_empty() {
        return Err(Rule::IsRoot(root.path().to_path_buf()));
    }
    match root.access() {
        Access::ReadOnly => Ok(Located {
            root,
            namespace_dir: None,
            rest: below.to_path_buf(),
        }),
        Access::ReadWrite => match below.strip_prefix(namespace) {
            Ok(rest) if !rest.as_os_str().is_empty() => Ok(Located {
                root,
                namespace_dir: Some(namespace),
                rest: rest.to_path_buf(),
            }),
            _ => Err(Rule::NotUnderNamespace {
                root: root.path().to_path_buf(),
                dir: root.path().join(namespace),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots() -> StorageRoots {
        StorageRoots::new(vec![
            "/srv/images=readOnly".parse().unwrap(),
            "/srv/tenants=readWrite".parse().unwrap(),
        ])
        .unwrap()
    }

    fn refusal(path: &str, want: Access) -> String {
        locate(&roots(), "team-a", path, want)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_form_is_canonical_or_refused() {
        assert!(check_form("/").is_ok());
        assert!(check_form("/a/b.img").is_ok());
        assert!(
            check_form("/a/..b/c.").is_ok(),
            "dots inside names are names"
        );
        assert!(matches!(check_form("a/b"), Err(Rule::NotAbsolute)));
        assert!(matches!(check_form(""), Err(Rule::NotAbsolute)));
        assert!(matches!(check_form("/a/../b"), Err(Rule::ParentComponent)));
        assert!(matches!(check_form("/a/.."), Err(Rule::ParentComponent)));
        assert!(matches!(check_form("/a/./b"), Err(Rule::CurrentComponent)));
        assert!(matches!(check_form("//a"), Err(Rule::EmptyComponent)));
        assert!(matches!(check_form("/a//b"), Err(Rule::EmptyComponent)));
        assert!(matches!(check_form("/a/"), Err(Rule::EmptyComponent)));
        assert!(matches!(check_form("/a\0b"), Err(Rule::Nul)));
    }

    #[test]
    fn a_read_only_root_is_shared() {
        let roots = roots();
        for ns in ["team-a", "team-b"] {
            let l = locate(
                &roots,
                ns,
                "/srv/images/base/debian.qcow2",
                Access::ReadOnly,
            )
            .unwrap();
            assert_eq!(l.root.path(), Path::new("/srv/images"));
            assert_eq!(l.namespace_dir, None);
            assert_eq!(l.rest, Path::new("base/debian.qcow2"));
        }
    }

    #[test]
    fn a_read_write_root_is_per_namespace() {
        let roots = roots();
        let l = locate(
            &roots,
            "team-a",
            "/srv/tenants/team-a/vm/disk.img",
            Access::ReadWrite,
        )
        .unwrap();
        assert_eq!(l.namespace_dir, Some("team-a"));
        assert_eq!(l.rest, Path::new("vm/disk.img"));
        // Read-only use of one's own read-write directory is fine.
        assert!(
            locate(
                &roots,
                "team-a",
                "/srv/tenants/team-a/d.img",
                Access::ReadOnly
            )
            .is_ok()
        );
        assert_eq!(
            refusal("/srv/tenants/team-b/disk.img", Access::ReadOnly),
            "not under /srv/tenants/team-a/ (the namespace's directory of the read-write \
             storage root /srv/tenants)"
        );
        // A name that only starts with the namespace is another directory.
        assert!(refusal("/srv/tenants/team-ab/disk.img", Access::ReadWrite).contains("not under"));
        // The namespace's directory itself is not a file beneath it.
        assert!(refusal("/srv/tenants/team-a", Access::ReadWrite).contains("not under"));
        assert!(refusal("/srv/tenants/disk.img", Access::ReadWrite).contains("not under"));
    }

    #[test]
    fn what_is_refused_before_opening() {
        assert_eq!(
            refusal("/etc/shadow", Access::ReadOnly),
            "outside every storage root"
        );
        assert_eq!(
            refusal("/srv/images-old/x", Access::ReadOnly),
            "outside every storage root"
        );
        assert_eq!(
            refusal("/srv/images/base.img", Access::ReadWrite),
            "read-write under a read-only root (/srv/images)"
        );
        assert!(
            refusal("/srv/images", Access::ReadOnly)
                .contains("the storage root /srv/images itself")
        );
        assert_eq!(
            refusal("/srv/tenants/team-a/../../../etc/shadow", Access::ReadOnly),
            "has a '..' component"
        );
        for ns in ["", "Team-A", "-a", "a/b", "..", &"a".repeat(64)] {
            let err = locate(&roots(), ns, "/srv/images/x", Access::ReadOnly).unwrap_err();
            assert!(matches!(err, Rule::BadNamespace(_)), "{ns:?}: {err}");
        }
    }
}
