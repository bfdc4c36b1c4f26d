//! The QEMU command line for a [`Domain`]: a plain argument vector, no shell anywhere.

use crate::domain::{CharDevice, Device, Domain, VirtType};
use std::path::{Path, PathBuf};

/// The domain asks for something this agent cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("domain cannot be run: {0}")]
pub struct UnsupportedError(pub String);

/// Host-side places the command line refers to.
#[derive(Debug, Clone)]
pub struct HostPaths {
    /// The QMP monitor socket.
    pub qmp_socket: PathBuf,
    /// The VM's state dir: serial output without an explicit path goes there.
    pub vm_dir: PathBuf,
}

/// Where a serial/console port writes: its explicit path or `<vm_dir>/serial<port>.log`.
pub fn serial_path(c: &CharDevice, vm_dir: &Path) -> PathBuf {
    match &c.path {
        Some(p) => PathBuf::from(p),
        None => vm_dir.join(format!("serial{}.log", c.port)),
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
    for (i, dev) in domain.devices.iter().enumerate() {
        match dev {
            Device::Disk(d) => {
                let id = format!("drive-{}", d.target_dev);
                push(&[
                    "-blockdev",
                    &format!(
                        "driver=file,filename={},node-name={id}-file,cache.direct=off",
                        opt_value(&d.source)?
                    ),
                    "-blockdev",
                    &format!("driver={},file={id}-file,node-name={id}", d.format),
                ]);
                let device = match d.bus.as_str() {
                    "virtio" => format!("virtio-blk-pci,drive={id},id={}", d.target_dev),
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
                    &format!("user,id=hostnet{nic}"),
                    "-device",
                    &format!("{model},netdev=hostnet{nic},id=net{nic},mac={}", n.mac),
                ]);
                nic += 1;
            }
            Device::Graphics(g) => {
                let listen = opt_value(&g.listen)?;
                let vnc = match g.port {
                    Some(p) => format!("{listen}:{}", p - 5900),
                    None => format!("{listen}:0,to=99"),
                };
                push(&["-vga", "std", "-vnc", &vnc]);
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
        }
    }

    #[test]
    fn builds_argv() {
        let a = qemu_args(&sample(), &paths(), true).unwrap();
        let joined = a.join(" ");
        assert!(joined.contains("-machine pc,accel=tcg,acpi=on"));
        assert!(joined.contains("-m 262144k"));
        assert!(joined.contains("ide-hd,drive=drive-hda,id=hda,bus=ide.0,unit=0,bootindex=1"));
        assert!(joined.contains("virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:aa:bb:01"));
        assert!(joined.contains("-vnc 127.0.0.1:0,to=99"));
        assert!(joined.contains("path=/run/ferry/vms/guest-1/serial0.log"));
        assert!(joined.ends_with("-S -incoming defer"));
    }

    #[test]
    fn refuses_option_injection() {
        let x = SAMPLE.replace("guest-1.img", "guest-1.img,readonly=on");
        let d = Domain::parse(&x).unwrap();
        assert!(qemu_args(&d, &paths(), false).is_err());
    }
}
