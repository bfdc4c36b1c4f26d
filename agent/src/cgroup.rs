//! Guests outside the agent's container (issue 16): each guest's QEMU runs in a cgroup
//! of its own on the host, `<parent>/<guest key>`, with the domain's memory and CPU as
//! its limits, not in the cgroup of the process that started it.
//!
//! A container runtime kills everything left in a container's cgroup when the
//! container ends (a crash, an OOM kill, a liveness failure, `helm upgrade`), and the
//! container's memory limit would cover every guest's RAM. So the agent is given the
//! host's cgroup file system (`--cgroup-root`, the chart mounts the host's
//! `/sys/fs/cgroup` there) and a parent for its guests (`--guest-cgroup-parent`,
//! default `ferry.slice`); [`GuestCgroups::prepare`] creates the guest's cgroup in
//! each hierarchy Ferry uses and writes its limits before QEMU starts, and the forked
//! child moves itself in ([`Placement::enter`]) before it executes QEMU, so QEMU
//! allocates nothing while in the agent's cgroup.
//!
//! Both layouts: cgroup v2 (one unified hierarchy: `memory.max`, `cpu.weight`) and v1
//! (a hierarchy per controller: `memory/…/memory.limit_in_bytes`,
//! `cpu/…/cpu.shares`; the hybrid layout counts as v1). In v1 the guest gets its cgroup
//! in every hierarchy, not only memory and cpu: runc finds a container's processes to
//! kill in one of the others (e.g. `devices`, `freezer`, `pids`), so a QEMU left in the
//! agent container's cgroup of any hierarchy dies with the container. A new cpuset
//! cgroup gets its parent's CPUs and memory nodes (it admits no process before). What
//! to write is decided by [`limits`] and [`Layout::writes`], pure functions.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::domain::Domain;

/// Memory a guest's QEMU may use beyond the guest's RAM (device emulation, the TCG
/// translation cache, migration buffers, the zstd contexts of multifd channels) before
/// the kernel reclaims and, at the hard limit, kills it. Generous on purpose: a guest
/// killed by its own limit is a guest lost.
pub const DEFAULT_OVERHEAD_MIB: u64 = 512;

/// Why a guest's cgroup could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "{root}: neither a cgroup v2 file system nor cgroup v1 hierarchies for memory and cpu (give the host's /sys/fs/cgroup as --cgroup-root)"
    )]
    NoHierarchy { root: PathBuf },
    #[error("cgroup {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The cgroup layout of the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// One unified hierarchy at this path.
    V2(PathBuf),
    /// The memory and cpu hierarchies, and every other one (each once, whatever
    /// symbolic links name it; named ones such as `systemd` and the hybrid layout's
    /// `unified` included).
    V1 {
        memory: PathBuf,
        cpu: PathBuf,
        others: Vec<PathBuf>,
    },
}

/// What a guest's cgroup limits: memory in bytes, CPU as a relative weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    /// Proportional to the vCPUs: 100 per vCPU in v2 terms (the default weight of a
    /// cgroup is 100), 1024 per vCPU in v1 shares.
    pub vcpus: u32,
}

/// The limits of `domain`'s QEMU: its RAM and `overhead_mib` more, its vCPUs.
pub fn limits(domain: &Domain, overhead_mib: u64) -> Limits {
    Limits {
        memory_bytes: domain.memory_kib * 1024 + overhead_mib * 1024 * 1024,
        vcpus: domain.vcpus.max(1),
    }
}

impl Layout {
    /// The layout of the cgroup file system mounted at `root`.
    pub fn detect(root: &Path) -> Result<Layout, CgroupError> {
        if root.join("cgroup.controllers").is_file() {
            return Ok(Layout::V2(root.to_path_buf()));
        }
        let hierarchy = |names: &[&str]| {
            names
                .iter()
                .map(|n| root.join(n))
                .find(|p| p.join("cgroup.procs").is_file())
        };
        match (hierarchy(&["memory"]), hierarchy(&["cpu", "cpu,cpuacct"])) {
            (Some(memory), Some(cpu)) => {
                let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
                let mut seen = vec![real(&memory), real(&cpu)];
                let mut others = Vec::new();
                let mut entries: Vec<PathBuf> = std::fs::read_dir(root)
                    .map_err(|source| CgroupError::Io {
                        path: root.to_path_buf(),
                        what: "listing the hierarchies",
                        source,
                    })?
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.join("cgroup.procs").is_file())
                    .collect();
                entries.sort();
                for p in entries {
                    let r = real(&p);
                    if !seen.contains(&r) {
                        seen.push(r);
                        others.push(p);
                    }
                }
                Ok(Layout::V1 {
                    memory,
                    cpu,
                    others,
                })
            }
            _ => Err(CgroupError::NoHierarchy {
                root: root.to_path_buf(),
            }),
        }
    }

    /// The hierarchies a guest has a cgroup in (v1: memory, cpu, then the others).
    fn hierarchies(&self) -> Vec<&Path> {
        match self {
            Layout::V2(root) => vec![root.as_path()],
            Layout::V1 {
                memory,
                cpu,
                others,
            } => [memory.as_path(), cpu.as_path()]
                .into_iter()
                .chain(others.iter().map(PathBuf::as_path))
                .collect(),
        }
    }

    /// The guest's cgroup directories: `<hierarchy>/<parent>/<key>` in each (v1: memory
    /// first, cpu second).
    pub fn dirs(&self, parent: &str, key: &str) -> Vec<PathBuf> {
        self.hierarchies()
            .into_iter()
            .map(|h| h.join(parent).join(key))
            .collect()
    }

    /// The files to write, in order, for a guest with `limits` in the cgroups `dirs`
    /// gave: `(dir, file, value)`.
    pub fn writes(&self, dirs: &[PathBuf], limits: Limits) -> Vec<(PathBuf, &'static str, String)> {
        let memory = limits.memory_bytes.to_string();
        match self {
            Layout::V2(_) => vec![
                (dirs[0].clone(), "memory.max", memory),
                (
                    dirs[0].clone(),
                    "cpu.weight",
                    (100 * limits.vcpus).min(10_000).to_string(),
                ),
            ],
            Layout::V1 { .. } => vec![
                (dirs[0].clone(), "memory.limit_in_bytes", memory),
                (
                    dirs[1].clone(),
                    "cpu.shares",
                    (1024 * limits.vcpus).to_string(),
                ),
            ],
        }
    }

    /// The parents to create first (each hierarchy's root and the parent's path in it).
    fn parents(&self, parent: &str) -> Vec<(PathBuf, PathBuf)> {
        self.hierarchies()
            .into_iter()
            .map(|h| (h.to_path_buf(), h.join(parent)))
            .collect()
    }
}

/// This node's guest cgroups: the host's cgroup file system and the parent under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestCgroups {
    layout: Layout,
    parent: String,
    overhead_mib: u64,
}

/// A guest's cgroups, ready: their `cgroup.procs`, open for the child to write.
#[derive(Debug)]
pub struct Placement {
    procs: Vec<OwnedFd>,
}

impl GuestCgroups {
    /// The guest cgroups under `parent` (a relative path, e.g. `ferry.slice`) of the
    /// cgroup file system at `root`, each allowed `overhead_mib` beyond its RAM.
    pub fn new(root: &Path, parent: &str, overhead_mib: u64) -> Result<GuestCgroups, CgroupError> {
        Ok(GuestCgroups {
            layout: Layout::detect(root)?,
            parent: parent.trim_matches('/').to_string(),
            overhead_mib,
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The cgroup directories of the guest keyed `key`.
    pub fn dirs(&self, key: &str) -> Vec<PathBuf> {
        self.layout.dirs(&self.parent, key)
    }

    /// Creates the guest's cgroups with `domain`'s limits and opens them for the child.
    pub fn prepare(&self, key: &str, domain: &Domain) -> Result<Placement, CgroupError> {
        let io_err = |path: &Path, what| {
            let path = path.to_path_buf();
            move |source| CgroupError::Io { path, what, source }
        };
        for (hierarchy, parent) in self.layout.parents(&self.parent) {
            std::fs::create_dir_all(&parent).map_err(io_err(&parent, "creating"))?;
            inherit_cpuset(&hierarchy, &parent).map_err(io_err(&parent, "copying cpuset"))?;
            if let Layout::V2(_) = self.layout {
                // Children of a v2 cgroup get a controller only if the parent enables it.
                let control = parent.join("cgroup.subtree_control");
                std::fs::write(&control, "+memory +cpu")
                    .map_err(io_err(&control, "enabling memory and cpu"))?;
            }
        }
        let dirs = self.dirs(key);
        for dir in &dirs {
            match std::fs::create_dir(dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(io_err(dir, "creating")(e));
                }
                _ => {}
            }
            if let Some(parent) = dir.parent() {
                inherit_cpuset(parent, dir).map_err(io_err(dir, "copying cpuset"))?;
            }
        }
        for (dir, file, value) in self.layout.writes(&dirs, limits(domain, self.overhead_mib)) {
            let path = dir.join(file);
            std::fs::write(&path, value).map_err(io_err(&path, "writing a limit"))?;
        }
        let mut procs = Vec::new();
        for dir in &dirs {
            let path = dir.join("cgroup.procs");
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(io_err(&path, "opening"))?;
            procs.push(OwnedFd::from(file));
        }
        Ok(Placement { procs })
    }

    /// Removes the guest's cgroups (once its QEMU is gone); a missing one is fine.
    pub fn remove(&self, key: &str) -> Result<(), CgroupError> {
        for dir in self.dirs(key) {
            match std::fs::remove_dir(&dir) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(CgroupError::Io {
                        path: dir,
                        what: "removing",
                        source: e,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// In a cpuset hierarchy, gives every cgroup from below `top` down to `dir` that has
/// no CPUs or memory nodes yet its parent's. Elsewhere nothing.
fn inherit_cpuset(top: &Path, dir: &Path) -> io::Result<()> {
    if !top.join("cpuset.cpus").is_file() {
        return Ok(());
    }
    let mut chain = Vec::new();
    let mut d = dir;
    while d != top && d.starts_with(top) {
        chain.push(d.to_path_buf());
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    for d in chain.iter().rev() {
        let parent = d.parent().unwrap_or(top);
        for f in ["cpuset.cpus", "cpuset.mems"] {
            if std::fs::read_to_string(d.join(f))?.trim().is_empty() {
                std::fs::write(d.join(f), std::fs::read_to_string(parent.join(f))?.trim())?;
            }
        }
    }
    Ok(())
}

impl Placement {
    /// Moves the calling process into the guest's cgroups: for the forked child, before
    /// it executes QEMU. Writes `0` (the writer itself) to each `cgroup.procs` opened
    /// beforehand: only `write(2)`, which is async-signal-safe.
    pub fn enter(&self) -> io::Result<()> {
        for fd in &self.procs {
            // SAFETY: a plain write(2) of a static buffer to a descriptor we own.
            let n = unsafe { nix::libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if n != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(memory_kib: u64, vcpus: u32) -> Domain {
        let xml = format!(
            "<domain type='qemu'><name>g</name><uuid>3c8f5b1e-8a0e-4f7c-9d2b-1a2b3c4d5e6f</uuid>\
             <memory unit='KiB'>{memory_kib}</memory><vcpu>{vcpus}</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><devices/></domain>"
        );
        Domain::parse(&xml).unwrap()
    }

    #[test]
    fn limits_are_the_guests_ram_and_overhead_and_its_vcpus() {
        let l = limits(&domain(64 * 1024, 2), 512);
        assert_eq!(l.memory_bytes, (64 + 512) << 20);
        assert_eq!(l.vcpus, 2);
    }

    #[test]
    fn v1_writes_memory_and_shares_in_their_hierarchies() {
        let layout = Layout::V1 {
            memory: "/h/memory".into(),
            cpu: "/h/cpu,cpuacct".into(),
            others: vec!["/h/pids".into()],
        };
        let dirs = layout.dirs("ferry.slice", "default.demo-0123");
        assert_eq!(
            dirs,
            vec![
                PathBuf::from("/h/memory/ferry.slice/default.demo-0123"),
                PathBuf::from("/h/cpu,cpuacct/ferry.slice/default.demo-0123"),
                PathBuf::from("/h/pids/ferry.slice/default.demo-0123"),
            ]
        );
        let w = layout.writes(&dirs, limits(&domain(1 << 20, 4), 512));
        assert_eq!(w[0].1, "memory.limit_in_bytes");
        assert_eq!(w[0].2, ((1024 + 512) << 20u64).to_string());
        assert_eq!((w[1].1, w[1].2.as_str()), ("cpu.shares", "4096"));
        assert_eq!(w[1].0, dirs[1]);
    }

    #[test]
    fn v2_writes_max_and_weight_in_the_one_hierarchy() {
        let layout = Layout::V2("/sys/fs/cgroup".into());
        let dirs = layout.dirs("ferry.slice", "k");
        assert_eq!(dirs, vec![PathBuf::from("/sys/fs/cgroup/ferry.slice/k")]);
        let w = layout.writes(&dirs, limits(&domain(2 << 20, 200), 0));
        assert_eq!(
            (w[0].1, w[0].2.clone()),
            ("memory.max", (2u64 << 30).to_string())
        );
        assert_eq!((w[1].1, w[1].2.as_str()), ("cpu.weight", "10000"), "capped");
    }

    #[test]
    fn a_new_cpuset_cgroup_gets_its_parents_cpus_and_memory_nodes() {
        let top = tempfile::tempdir().unwrap();
        for f in ["cpuset.cpus", "cpuset.mems"] {
            std::fs::write(top.path().join(f), "0-1\n").unwrap();
        }
        let dir = top.path().join("ferry.slice/guest");
        std::fs::create_dir_all(&dir).unwrap();
        for d in [top.path().join("ferry.slice"), dir.clone()] {
            for f in ["cpuset.cpus", "cpuset.mems"] {
                std::fs::write(d.join(f), "").unwrap();
            }
        }
        inherit_cpuset(top.path(), &dir).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cpuset.cpus")).unwrap(),
            "0-1"
        );
        assert_eq!(
            std::fs::read_to_string(top.path().join("ferry.slice/cpuset.mems")).unwrap(),
            "0-1"
        );
        // Not a cpuset hierarchy: nothing is written.
        let plain = tempfile::tempdir().unwrap();
        inherit_cpuset(plain.path(), &plain.path().join("x")).unwrap();
    }

    #[test]
    fn detects_each_layout_and_refuses_neither() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Layout::detect(dir.path()),
            Err(CgroupError::NoHierarchy { .. })
        ));
        for h in ["memory", "cpu,cpuacct", "devices", "pids"] {
            std::fs::create_dir(dir.path().join(h)).unwrap();
            std::fs::write(dir.path().join(h).join("cgroup.procs"), "").unwrap();
        }
        // Symbolic links to a hierarchy name it once; a directory without cgroup.procs
        // is none.
        std::os::unix::fs::symlink("cpu,cpuacct", dir.path().join("cpu")).unwrap();
        std::os::unix::fs::symlink("cpu,cpuacct", dir.path().join("cpuacct")).unwrap();
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        assert_eq!(
            Layout::detect(dir.path()).unwrap(),
            Layout::V1 {
                memory: dir.path().join("memory"),
                cpu: dir.path().join("cpu"),
                others: vec![dir.path().join("devices"), dir.path().join("pids")],
            }
        );
        std::fs::write(dir.path().join("cgroup.controllers"), "memory cpu").unwrap();
        assert_eq!(
            Layout::detect(dir.path()).unwrap(),
            Layout::V2(dir.path().to_path_buf())
        );
    }
}
