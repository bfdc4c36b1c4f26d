//! Host paths beneath the storage roots (`ferry_agent::storage`) on a real filesystem:
//! temporary directories, files, symbolic links, a FIFO, a socket and a device node. No
//! QEMU. Needs root (mknod).
//!
//! Each refusal is checked for its message: the field, the path, and the rule.

use ferry_agent::storage::{
    Access, FileKind, Finalize, ImageFormat, Opened, Rule, StorageError, StorageRoots, UserPath,
    check_image, create_save, open_beneath, remove_partial,
};
use ferry_agent::testguest::qcow2_header;
use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use std::fs;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

const DISK: &str = "spec.domainXML: <disk> vda <source file>";
const SAVE: &str = "spec.toFile.path";
const NS: &str = "team-a";

/// `<top>/images` (read-only root), `<top>/tenants` (read-write root) with `team-a/`
/// and `team-b/`, and `<top>/outside`, beneath no root.
struct Fixture {
    _tmp: tempfile::TempDir,
    images: PathBuf,
    tenants: PathBuf,
    outside: PathBuf,
    roots: StorageRoots,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let top = tmp.path().to_path_buf();
    let (images, tenants, outside) = (top.join("images"), top.join("tenants"), top.join("outside"));
    for d in [
        &images,
        &tenants.join("team-a/sub"),
        &tenants.join("team-b"),
        &outside,
    ] {
        fs::create_dir_all(d).unwrap();
    }
    fs::write(images.join("base.raw"), [0u8; 4096]).unwrap();
    fs::write(tenants.join("team-a/disk.img"), b"team-a's disk").unwrap();
    fs::write(tenants.join("team-b/disk.img"), b"team-b's disk").unwrap();
    fs::write(outside.join("secret"), b"the node's secret").unwrap();
    let roots = StorageRoots::new(vec![
        format!("{}=readOnly", images.display()).parse().unwrap(),
        format!("{}=readWrite", tenants.display()).parse().unwrap(),
    ])
    .unwrap();
    Fixture {
        _tmp: tmp,
        images,
        tenants,
        outside,
        roots,
    }
}

impl Fixture {
    fn open(&self, path: &Path, want: Access) -> Result<Opened, StorageError> {
        self.open_as(NS, path, want)
    }

    fn open_as(&self, ns: &str, path: &Path, want: Access) -> Result<Opened, StorageError> {
        let path = path.to_str().unwrap();
        open_beneath(&self.roots, ns, UserPath { field: DISK, path }, want)
    }

    fn team_a(&self, rest: &str) -> PathBuf {
        self.tenants.join(NS).join(rest)
    }

    fn save(&self, path: &Path) -> Result<(OwnedFd, Finalize), StorageError> {
        let path = path.to_str().unwrap();
        create_save(&self.roots, NS, UserPath { field: SAVE, path })
    }
}

/// The error of a refused call, after checking its message names `field`, `path` and
/// `rule`.
fn refused<T: std::fmt::Debug>(
    result: Result<T, StorageError>,
    field: &str,
    path: &str,
    rule: &str,
) -> StorageError {
    let err = result.expect_err("refused");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{field}: {path}: ")),
        "{message:?} does not start with the field and path"
    );
    assert!(message.contains(rule), "{message:?} does not say {rule:?}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn opens_regular_files_beneath_their_roots() {
    let fx = fixture();
    let base = fx
        .open(&fx.images.join("base.raw"), Access::ReadOnly)
        .unwrap();
    assert_eq!(base.path(), fx.images.join("base.raw"));
    assert_eq!(base.field(), DISK);
    // Another namespace uses the read-only root too.
    fx.open_as("team-b", &fx.images.join("base.raw"), Access::ReadOnly)
        .unwrap();

    let disk = fx.open(&fx.team_a("disk.img"), Access::ReadWrite).unwrap();
    let flags = OFlag::from_bits_truncate(fcntl(disk.fd(), FcntlArg::F_GETFL).unwrap());
    assert_eq!(flags & OFlag::O_ACCMODE, OFlag::O_RDWR);
    assert!(!flags.contains(OFlag::O_NONBLOCK), "the guard is cleared");
    let fd_flags = FdFlag::from_bits_truncate(fcntl(disk.fd(), FcntlArg::F_GETFD).unwrap());
    assert!(fd_flags.contains(FdFlag::FD_CLOEXEC));
    let mut contents = String::new();
    fs::File::from(disk.into_fd())
        .read_to_string(&mut contents)
        .unwrap();
    assert_eq!(contents, "team-a's disk");

    let read_only = fx.open(&fx.team_a("disk.img"), Access::ReadOnly).unwrap();
    let flags = OFlag::from_bits_truncate(fcntl(read_only.fd(), FcntlArg::F_GETFL).unwrap());
    assert_eq!(flags & OFlag::O_ACCMODE, OFlag::O_RDONLY);
}

#[test]
fn a_path_outside_every_root_is_refused() {
    let fx = fixture();
    refused(
        fx.open(Path::new("/etc/passwd"), Access::ReadOnly),
        DISK,
        "/etc/passwd",
        "outside every storage root",
    );
    let secret = fx.outside.join("secret");
    refused(
        fx.open(&secret, Access::ReadOnly),
        DISK,
        s(&secret),
        "outside every storage root",
    );
    refused(
        fx.open(Path::new("disk.img"), Access::ReadOnly),
        DISK,
        "disk.img",
        "not an absolute path",
    );
}

#[test]
fn dot_dot_is_refused() {
    let fx = fixture();
    let path = format!("{}/../../outside/secret", s(&fx.tenants.join(NS)));
    refused(
        fx.open(Path::new(&path), Access::ReadOnly),
        DISK,
        &path,
        "has a '..' component",
    );
    // Also where it would stay inside the root.
    let path = format!("{}/sub/../disk.img", s(&fx.tenants.join(NS)));
    refused(
        fx.open(Path::new(&path), Access::ReadOnly),
        DISK,
        &path,
        "has a '..' component",
    );
}

#[test]
fn doubled_slashes_are_refused_not_normalised() {
    let fx = fixture();
    let path = format!("{}//disk.img", s(&fx.tenants.join(NS)));
    refused(
        fx.open(Path::new(&path), Access::ReadOnly),
        DISK,
        &path,
        "doubled or trailing slash",
    );
    let path = format!("{}/./disk.img", s(&fx.tenants.join(NS)));
    refused(
        fx.open(Path::new(&path), Access::ReadOnly),
        DISK,
        &path,
        "a '.' component",
    );
}

#[test]
fn symbolic_links_are_refused_wherever_they_point() {
    let fx = fixture();
    // Out of the root, absolute and relative.
    symlink(fx.outside.join("secret"), fx.team_a("escape.img")).unwrap();
    symlink("../../outside/secret", fx.team_a("escape-relative.img")).unwrap();
    // Inside the root, even in the same directory: RESOLVE_NO_SYMLINKS refuses every
    // link, so no link is ever followed (and none needs judging).
    symlink("disk.img", fx.team_a("alias.img")).unwrap();
    for name in ["escape.img", "escape-relative.img", "alias.img"] {
        let path = fx.team_a(name);
        let err = refused(
            fx.open(&path, Access::ReadOnly),
            DISK,
            s(&path),
            "a symbolic link",
        );
        assert!(matches!(err.rule, Rule::SymbolicLink));
    }
}

#[test]
fn a_symlinked_directory_on_the_way_is_refused() {
    let fx = fixture();
    symlink(&fx.outside, fx.team_a("elsewhere")).unwrap();
    symlink("sub", fx.team_a("sub-alias")).unwrap();
    fs::write(fx.team_a("sub/disk.img"), b"x").unwrap();
    for path in [
        fx.team_a("elsewhere/secret"),
        fx.team_a("sub-alias/disk.img"),
    ] {
        refused(
            fx.open(&path, Access::ReadOnly),
            DISK,
            s(&path),
            "a symbolic link, or beneath one",
        );
    }
    // The namespace's directory itself.
    symlink(&fx.outside, fx.tenants.join("team-c")).unwrap();
    let path = fx.tenants.join("team-c/secret");
    refused(
        fx.open_as("team-c", &path, Access::ReadOnly),
        DISK,
        s(&path),
        "a symbolic link",
    );
}

#[test]
fn only_regular_files_are_opened() {
    let fx = fixture();
    // Were the FIFO opened for reading without O_NONBLOCK, this test would hang.
    nix::unistd::mkfifo(&fx.team_a("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
    // /dev/null's numbers: harmless even if it were opened.
    mknod(
        &fx.team_a("null"),
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        makedev(1, 3),
    )
    .expect("mknod (this test needs root)");
    let _socket = std::os::unix::net::UnixListener::bind(fx.team_a("socket")).unwrap();
    for (name, rule, kind) in [
        ("fifo", "a FIFO, not a regular file", FileKind::Fifo),
        (
            "null",
            "a character device, not a regular file",
            FileKind::CharDevice,
        ),
        ("socket", "a socket, not a regular file", FileKind::Socket),
        (
            "sub",
            "a directory, not a regular file",
            FileKind::Directory,
        ),
    ] {
        let path = fx.team_a(name);
        for want in [Access::ReadOnly, Access::ReadWrite] {
            let err = refused(fx.open(&path, want), DISK, s(&path), rule);
            assert!(matches!(err.rule, Rule::NotRegular(k) if k == kind));
        }
    }
    let missing = fx.team_a("missing.img");
    refused(
        fx.open(&missing, Access::ReadOnly),
        DISK,
        s(&missing),
        "does not exist",
    );
    let through_file = fx.team_a("disk.img/x");
    refused(
        fx.open(&through_file, Access::ReadOnly),
        DISK,
        s(&through_file),
        "not a directory",
    );
}

#[test]
fn another_namespaces_directory_is_refused() {
    let fx = fixture();
    let theirs = fx.tenants.join("team-b/disk.img");
    let rule = format!("not under {}/", s(&fx.tenants.join(NS)));
    for want in [Access::ReadOnly, Access::ReadWrite] {
        refused(fx.open(&theirs, want), DISK, s(&theirs), &rule);
    }
    // Directly in the read-write root, outside any namespace's directory.
    fs::write(fx.tenants.join("shared.img"), b"x").unwrap();
    let shared = fx.tenants.join("shared.img");
    refused(fx.open(&shared, Access::ReadOnly), DISK, s(&shared), &rule);
}

#[test]
fn read_write_under_a_read_only_root_is_refused() {
    let fx = fixture();
    let base = fx.images.join("base.raw");
    let rule = format!("read-write under a read-only root ({})", s(&fx.images));
    refused(fx.open(&base, Access::ReadWrite), DISK, s(&base), &rule);
    let save = fx.images.join("saved.fsav");
    refused(fx.save(&save), SAVE, s(&save), &rule);
    assert!(!save.exists());
}

#[test]
fn images_are_checked_against_their_declared_format() {
    let fx = fixture();
    fs::write(fx.team_a("plain.qcow2"), qcow2_header(None)).unwrap();
    fs::write(fx.team_a("backed.qcow2"), qcow2_header(Some("/etc/shadow"))).unwrap();
    let image = |name: &str| fx.open(&fx.team_a(name), Access::ReadOnly).unwrap();

    check_image(&image("plain.qcow2"), ImageFormat::Qcow2).unwrap();
    check_image(&image("disk.img"), ImageFormat::Raw).unwrap();

    let backed = fx.team_a("backed.qcow2");
    refused(
        check_image(&image("backed.qcow2"), ImageFormat::Qcow2),
        DISK,
        s(&backed),
        "a qcow2 with a backing file (\"/etc/shadow\")",
    );
    // The guest wrote a qcow2 header into its raw disk.
    let mut confused = fs::OpenOptions::new()
        .write(true)
        .open(fx.team_a("disk.img"))
        .unwrap();
    confused
        .write_all(&qcow2_header(Some("/etc/shadow"))[..512])
        .unwrap();
    refused(
        check_image(&image("disk.img"), ImageFormat::Raw),
        DISK,
        s(&fx.team_a("disk.img")),
        "declared raw but starts with a qcow2 header",
    );
    refused(
        check_image(
            &fx.open(&fx.images.join("base.raw"), Access::ReadOnly)
                .unwrap(),
            ImageFormat::Qcow2,
        ),
        DISK,
        s(&fx.images.join("base.raw")),
        "declared qcow2 but has no qcow2 header",
    );
}

/// The names in a directory, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn a_finalized_save_lands_in_place() {
    let fx = fixture();
    let path = fx.team_a("sub/demo.fsav");
    let (fd, finalize) = fx.save(&path).unwrap();
    assert_eq!(finalize.path(), path);
    let mut file = fs::File::from(fd);
    file.write_all(b"saved state").unwrap();
    file.sync_all().unwrap();
    assert!(!path.exists(), "not in place before the commit");
    assert_eq!(
        listing(&fx.team_a("sub")).len(),
        1,
        "only the temporary file"
    );
    assert_eq!(finalize.commit().unwrap(), path);
    assert_eq!(fs::read(&path).unwrap(), b"saved state");
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        listing(&fx.team_a("sub")),
        ["demo.fsav"],
        "no temporary file left"
    );

    // Directly in the namespace's directory, too.
    let (_, finalize) = fx.save(&fx.team_a("top.fsav")).unwrap();
    finalize.commit().unwrap();
    assert!(fx.team_a("top.fsav").is_file());
}

#[test]
fn a_save_never_replaces_a_file() {
    let fx = fixture();
    // Already there when the save starts.
    let existing = fx.team_a("disk.img");
    refused(
        fx.save(&existing),
        SAVE,
        s(&existing),
        "already exists (a save never replaces a file)",
    );
    assert_eq!(fs::read(&existing).unwrap(), b"team-a's disk");

    // Appearing while the save runs: the rename refuses it.
    let path = fx.team_a("late.fsav");
    let mut expected = listing(&fx.tenants.join(NS));
    let (fd, finalize) = fx.save(&path).unwrap();
    fs::File::from(fd).write_all(b"saved state").unwrap();
    fs::write(&path, b"someone else's").unwrap();
    refused(finalize.commit(), SAVE, s(&path), "already exists");
    assert_eq!(fs::read(&path).unwrap(), b"someone else's");
    expected.push("late.fsav".to_string());
    expected.sort();
    assert_eq!(
        listing(&fx.tenants.join(NS)),
        expected,
        "the temporary file is gone"
    );

    // A symbolic link in the save's place counts as a file.
    symlink(fx.outside.join("secret"), fx.team_a("link.fsav")).unwrap();
    refused(
        fx.save(&fx.team_a("link.fsav")),
        SAVE,
        s(&fx.team_a("link.fsav")),
        "already exists",
    );
    assert_eq!(
        fs::read(fx.outside.join("secret")).unwrap(),
        b"the node's secret"
    );
}

#[test]
fn a_dropped_save_leaves_nothing() {
    let fx = fixture();
    let before = listing(&fx.tenants.join(NS));
    let (fd, finalize) = fx.save(&fx.team_a("abandoned.fsav")).unwrap();
    fs::File::from(fd).write_all(b"half a save").unwrap();
    drop(finalize);
    assert_eq!(listing(&fx.tenants.join(NS)), before);
}

/// A save whose process died (here: its Finalize forgotten, neither committed nor
/// dropped) leaves its temporary file; `remove_partial` with the recorded name removes
/// it, and only a name of that save's temporary files.
#[test]
fn a_dead_saves_temporary_file_is_removed_by_its_recorded_name() {
    let fx = fixture();
    let before = listing(&fx.tenants.join(NS));
    let path = fx.team_a("crashed.fsav");
    let (fd, finalize) = fx.save(&path).unwrap();
    fs::File::from(fd).write_all(b"half a save").unwrap();
    let temp = finalize.temp_name();
    std::mem::forget(finalize);
    assert!(fx.tenants.join(NS).join(&temp).exists(), "{temp} left");
    let user = UserPath {
        field: SAVE,
        path: s(&path),
    };
    // Not a temporary file of this save: refused, nothing removed.
    fs::write(fx.team_a("keep.fsav"), b"a finished save").unwrap();
    for other in [
        "keep.fsav",
        ".other.fsav.1-0.partial",
        "../x/.crashed.fsav.1-0.partial",
    ] {
        assert!(
            remove_partial(&fx.roots, NS, user, other).is_err(),
            "{other}"
        );
    }
    assert!(
        remove_partial(&fx.roots, NS, user, &temp).unwrap(),
        "removed"
    );
    assert!(
        !remove_partial(&fx.roots, NS, user, &temp).unwrap(),
        "gone already"
    );
    fs::remove_file(fx.team_a("keep.fsav")).unwrap();
    assert_eq!(listing(&fx.tenants.join(NS)), before);
}

#[test]
fn a_save_needs_its_directory() {
    let fx = fixture();
    let path = fx.team_a("no-such-dir/x.fsav");
    refused(
        fx.save(&path),
        SAVE,
        s(&path),
        "its directory does not exist",
    );
    let path = fx.tenants.join("team-new/x.fsav");
    let err = create_save(
        &fx.roots,
        "team-new",
        UserPath {
            field: SAVE,
            path: s(&path),
        },
    );
    refused(err, SAVE, s(&path), "its directory does not exist");
}

#[test]
fn a_save_into_a_symlinked_directory_is_refused_as_a_link() {
    let fx = fixture();
    symlink(&fx.outside, fx.team_a("elsewhere")).unwrap();
    symlink("sub", fx.team_a("sub-alias")).unwrap();
    for dir in ["elsewhere", "sub-alias"] {
        let path = fx.team_a(&format!("{dir}/x.fsav"));
        refused(fx.save(&path), SAVE, s(&path), "a symbolic link");
    }
    // A file where a directory should be is still that.
    let path = fx.team_a("disk.img/x.fsav");
    refused(fx.save(&path), SAVE, s(&path), "not a directory");
    assert!(listing(&fx.outside).iter().all(|f| f == "secret"));
}

/// Nothing outside the roots is created, opened or read, whichever way a path tries to
/// get there: the outside directory's listing is unchanged and inotify saw no event on
/// it (and does see one when the file is opened directly, so the watch works).
#[test]
fn nothing_outside_the_roots_is_touched() {
    let fx = fixture();
    symlink(&fx.outside, fx.team_a("elsewhere")).unwrap();
    symlink(fx.outside.join("secret"), fx.team_a("secret.img")).unwrap();
    symlink(&fx.outside, fx.tenants.join("team-c")).unwrap();
    let before = listing(&fx.outside);

    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    inotify
        .add_watch(&fx.outside, AddWatchFlags::IN_ALL_EVENTS)
        .unwrap();
    let events = || match inotify.read_events() {
        Ok(events) => events.len(),
        Err(nix::errno::Errno::EAGAIN) => 0,
        Err(e) => panic!("inotify: {e}"),
    };

    let team_a = s(&fx.tenants.join(NS)).to_string();
    let opens = [
        format!("{team_a}/../../outside/secret"),
        format!("{team_a}/elsewhere/secret"),
        format!("{team_a}/secret.img"),
    ];
    for path in &opens {
        for want in [Access::ReadOnly, Access::ReadWrite] {
            assert!(fx.open(Path::new(path), want).is_err(), "{path}");
        }
    }
    let saves = [
        format!("{team_a}/../../outside/new.fsav"),
        format!("{team_a}/elsewhere/new.fsav"),
        format!("{team_a}/secret.img"),
    ];
    for path in &saves {
        assert!(fx.save(Path::new(path)).is_err(), "{path}");
    }
    let via_namespace = s(&fx.tenants.join("team-c/new.fsav")).to_string();
    let r = create_save(
        &fx.roots,
        "team-c",
        UserPath {
            field: SAVE,
            path: &via_namespace,
        },
    );
    assert!(r.is_err());

    assert_eq!(events(), 0, "no event on the outside directory");
    assert_eq!(listing(&fx.outside), before);
    assert_eq!(
        fs::read(fx.outside.join("secret")).unwrap(),
        b"the node's secret"
    );

    // The control: the watch sees an open.
    let _file = fs::File::open(fx.outside.join("secret")).unwrap();
    assert!(events() > 0, "the watch works");
}
