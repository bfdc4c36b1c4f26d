//! The QEMU command line for a [`Domain`]: a plain argument vector, no shell anywhere.
//!
//! QEMU opens no host path a spec wrote. Each disk image is opened by the agent
//! ([`crate::storage::open_guest`]) and inherited by QEMU as a file descriptor: the
//! command line puts it in an fd set of its own (`-add-fd fd=N,set=S`) and the disk's
//! `file` node opens `/dev/fdset/S`, which QEMU serves by duplicating a descriptor of
//! the set with the same access mode. Serial and console output always go to the VM's
//! state dir, and the VNC console listens on a UNIX socket there (`vnc.sock`), never on a
//! TCP port. User-mode networking is isolated (`restrict=on`): a guest reaches neither
//! the node's loopback services nor the network behind the node.

use crate::domain::{CharDevice, Device, Domain, VirtType};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The domain asks for something this agent cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("domain cannot be run: {0}")]
pub struct UnsupportedError(pub String);

/// Host-side places and files the command line refers to.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// The QMP monitor socket.
    pub qmp_socket: PathBuf,
    /// The VM's state dir: serial output goes there.
    pub vm_dir: PathBuf,
    /// The disks' open images, one per disk of the domain.
    pub disks: Vec<DiskFd>,
}

/// A disk's image as QEMU inherits it: an open descriptor (without `FD_CLOEXEC` in
/// QEMU's process: [`inherit_fds`]) and how it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFd {
    /// The disk it belongs to (`<target dev>`).
    pub target_dev: String,
    pub fd: RawFd,
    /// Opened `O_RDONLY` (a `<readonly/>` disk) rather than `O_RDWR`.
    pub read_only: bool,
}

/// Where a serial/console port writes: `<vm_dir>/serial<port>.log`. A `<source path>`
/// in the definition is not used (the storage check refuses one in a spec).
pub fn serial_path(c: &CharDevice, vm_dir: &Path) -> PathBuf {
    vm_dir.join(format!("serial{}.log", c.port))
}

/// The VNC console's UNIX socket: `<vm_dir>/vnc.sock`. A spec's `listen` address is not
/// used; a fixed port is refused.
pub fn vnc_socket(vm_dir: &Path) -> PathBuf {
    vm_dir.join("vnc.sock")
}

/// Lets the child `cmd` spawns inherit `fds` (the agent opens every file close-on-exec;
/// the flag is cleared in the child only, between fork and exec, so no other process
/// the agent starts meanwhile gets them).
pub fn inherit_fds(cmd: &mut Command, fds: Vec<RawFd>) {
    // SAFETY: fcntl(F_SETFD) is async-signal-safe and the closure allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// The QEMU binary for the domain's architecture.
pub fn qemu_binary(domain: &Domain) -> String {
    format!("qemu-system-{}", domain.os.arch)
}

/// Builds the arguments (without the binary). `incoming` adds `-incoming defer` and `-S`
/// so the guest stays paused after the migration stream arrives, until `cont`.
pub fn qemu_args(
    domain: &Domain,
    paths: &HostPaths,
    incoming: bool,
) -> Result<Vec<String>, UnsupportedError> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    let accel = match domain.virt_type {
        VirtType::Qemu => "tcg",
        VirtType::Kvm => "kvm",
    };
    let acpi = if domain.features.iter().any(|f| f == "acpi") {
        "on"
    } else {
        "off"
    };
    let cpu = match domain.cpu.mode.as_str() {
        "host-passthrough" => "host".to_string(),
        "maximum" => "max".to_string(),
        _ => domain.cpu.model.clone().unwrap_or_else(|| "qemu64".into()),
    };
    push(&[
        "-name",
        &format!("guest={},debug-threads=on", domain.name),
        "-uuid",
        &domain.uuid.to_string(),
        "-machine",
        &format!("{},accel={accel},acpi={acpi}", domain.os.machine),
        "-cpu",
        &cpu,
        "-m",
        &format!("{}k", domain.memory_kib),
        "-smp",
        &domain.vcpus.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-msg",
        "timestamp=on",
        "-chardev",
        &format!(
            "socket,id=monitor,path={},server=on,wait=off",
            opt_path(&paths.qmp_socket)?
        ),
        "-mon",
        "chardev=monitor,mode=control",
    ]);
    let mut ide_unit = 0;
    let mut nic = 0;
    let mut fd_sets = 0;
    for (i, dev) in domain.devices.iter().enumerate() {
        match dev {
            Device::Disk(d) => {
                let id = format!("drive-{}", d.target_dev);
                let image = paths
                    .disks
                    .iter()
                    .find(|f| f.target_dev == d.target_dev)
                    .ok_or_else(|| {
                        UnsupportedError(format!("disk {}: its image was not opened", d.target_dev))
                    })?;
                if image.read_only != d.readonly {
                    return Err(UnsupportedError(format!(
                        "disk {}: its image was opened with the wrong access",
                        d.target_dev
                    )));
                }
                fd_sets += 1;
                let ro = if d.readonly { ",read-only=on" } else { "" };
                push(&[
                    "-add-fd",
                    &format!("fd={},set={fd_sets},opaque={}", image.fd, d.target_dev),
                    "-blockdev",
                    &format!(
                        "driver=file,filename=/dev/fdset/{fd_sets},node-name={id}-file,cache.direct=off{ro}"
                    ),
                    "-blockdev",
                    &format!("driver={},file={id}-file,node-name={id}{ro}", d.format),
                ]);
                let device = match d.bus.as_str() {
                    "virtio" => format!("virtio-blk-pci,drive={id},id={}", d.target_dev),
                    "ide" if d.readonly => {
                        return Err(UnsupportedError(format!(
                            "disk {}: an IDE disk cannot be read-only (use bus 'virtio')",
                            d.target_dev
                        )));
                    }
                    "ide" if ide_unit < 4 => {
                        let bus = format!("ide.{},unit={}", ide_unit / 2, ide_unit % 2);
                        ide_unit += 1;
                        format!("ide-hd,drive={id},id={},bus={bus}", d.target_dev)
                    }
                    other => return Err(UnsupportedError(format!("too many {other} disks"))),
                };
                push(&["-device", &format!("{device},bootindex={}", i + 1)]);
            }
            Device::Interface(n) => {
                if let Some(b) = &n.backend
                    && b != "default"
                {
                    return Err(UnsupportedError(format!(
                        "interface backend '{b}' is not available on this node"
                    )));
                }
                let model = match n.model.as_str() {
                    "virtio" => "virtio-net-pci",
                    other => other,
                };
                push(&[
                    "-netdev",
                    // Isolated: the guest reaches neither the node (its loopback services
                    // through the 10.0.2.2 alias) nor anything beyond it, the cloud
                    // metadata address included; slirp's own DHCP and DNS still answer.
                    &format!("user,id=hostnet{nic},restrict=on"),
                    "-device",
                    &format!("{model},netdev=hostnet{nic},id=net{nic},mac={}", n.mac),
                ]);
                nic += 1;
            }
            Device::Graphics(g) => {
                if let Some(port) = g.port {
                    return Err(UnsupportedError(format!(
                        "graphics: a fixed VNC port ({port}) cannot be honoured: the console \
                         listens on a UNIX socket in the VM's state dir, never on a TCP port \
                         (use autoport='yes')"
                    )));
                }
                let socket = vnc_socket(&paths.vm_dir);
                push(&[
                    "-vga",
                    "std",
                    "-vnc",
                    &format!("unix:{}", opt_path(&socket)?),
                ]);
            }
            Device::Serial(c) => {
                let path = serial_path(c, &paths.vm_dir);
                push(&[
                    "-chardev",
                    &format!("file,id=charserial{},path={}", c.port, opt_path(&path)?),
                    "-device",
                    &format!(
                        "isa-serial,chardev=charserial{0},id=serial{0},index={0}",
                        c.port
                    ),
                ]);
            }
            // A console of target type serial is libvirt's alias of that serial port.
            Device::Console(_) => {}
        }
    }
    if incoming {
        push(&["-S", "-incoming", "defer"]);
    }
    Ok(a)
}

/// A value inside a QEMU option list: commas would start a new option.
fn opt_value(s: &str) -> Result<&str, UnsupportedError> {
    if s.contains(',') {
        Err(UnsupportedError(format!("'{s}' contains a comma")))
    } else {
        Ok(s)
    }
}

fn opt_path(p: &Path) -> Result<&str, UnsupportedError> {
    let s = p
        .to_str()
        .ok_or_else(|| UnsupportedError(format!("{} is not UTF-8", p.display())))?;
    opt_value(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tests::{SAMPLE, sample};

    fn paths() -> HostPaths {
        HostPaths {
            qmp_socket: "/run/ferry/vms/guest-1/qmp.sock".into(),
            vm_dir: "/run/ferry/vms/guest-1".into(),
            disks: vec![DiskFd {
                target_dev: "hda".into(),
                fd: 7,
                read_only: false,
            }],
        }
    }

    #[test]
    fn builds_argv() {
        let a = qemu_args(&sample(), &paths(), true).unwrap();
        let joined = a.join(" ");
        assert!(joined.contains("-machine pc,accel=tcg,acpi=on"));
        assert!(joined.contains("-m 262144k"));
        assert!(joined.contains(
            "-add-fd fd=7,set=1,opaque=hda -blockdev driver=file,filename=/dev/fdset/1,node-name=drive-hda-file,cache.direct=off -blockdev driver=raw,file=drive-hda-file,node-name=drive-hda "
        ));
        assert!(!joined.contains("guest-1.img"), "QEMU gets no image path");
        assert!(joined.contains("ide-hd,drive=drive-hda,id=hda,bus=ide.0,unit=0,bootindex=1"));
        assert!(joined.contains("-netdev user,id=hostnet0,restrict=on -device"));
        assert!(joined.contains("virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:aa:bb:01"));
        assert!(joined.contains("-vga std -vnc unix:/run/ferry/vms/guest-1/vnc.sock"));
        assert!(joined.contains("path=/run/ferry/vms/guest-1/serial0.log"));
        assert!(joined.ends_with("-S -incoming defer"));
    }

    #[test]
    fn read_only_disks_and_unopened_images() {
        let x = SAMPLE
            .replace("bus='ide'/>", "bus='virtio'/><readonly/>")
            .replace("dev='hda'", "dev='vda'");
        let d = Domain::parse(&x).unwrap();
        let mut p = paths();
        p.disks[0].target_dev = "vda".into();
        let err = qemu_args(&d, &p, false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "domain cannot be run: disk vda: its image was opened with the wrong access"
        );
        p.disks[0].read_only = true;
        let joined = qemu_args(&d, &p, false).unwrap().join(" ");
        assert!(joined.contains("cache.direct=off,read-only=on -blockdev"));
        assert!(joined.contains("node-name=drive-vda,read-only=on"));
        p.disks.clear();
        let err = qemu_args(&d, &p, false).unwrap_err();
        assert!(
            err.to_string()
                .contains("disk vda: its image was not opened")
        );
        let ide = SAMPLE.replace("bus='ide'/>", "bus='ide'/><readonly/>");
        let mut p = paths();
        p.disks[0].read_only = true;
        let err = qemu_args(&Domain::parse(&ide).unwrap(), &p, false).unwrap_err();
        assert!(err.to_string().contains("an IDE disk cannot be read-only"));
    }

    #[test]
    fn a_fixed_vnc_port_is_refused() {
        let x = SAMPLE.replace("port='-1' autoport='yes'", "port='5905'");
        let err = qemu_args(&Domain::parse(&x).unwrap(), &paths(), false).unwrap_err();
        assert!(
            err.to_string()
                .contains("a fixed VNC port (5905) cannot be honoured")
        );
    }

    #[test]
    fn serial_output_stays_in_the_state_dir() {
        let x = SAMPLE.replace(
            "<serial type='file'>",
            "<serial type='file'><source path='/etc/shadow'/>",
        );
        let joined = qemu_args(&Domain::parse(&x).unwrap(), &paths(), false)
            .unwrap()
            .join(" ");
        assert!(!joined.contains("/etc/shadow"));
        assert!(joined.contains("path=/run/ferry/vms/guest-1/serial0.log"));
    }
}
