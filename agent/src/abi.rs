//! ABI stability check between the running definition and an app-supplied target one.
//!
//! Must be equal (the guest would notice): name, uuid, memory, vCPU count, arch, machine
//! type, CPU mode and model, features, the ordered device list with each device's kind,
//! bus, target and model, each disk's image format and read-only flag (the guest reads
//! the image through its format; a raw disk read as qcow2 would show other bytes, and
//! one a tenant's image could choose), NIC MAC and model, and the graphics and serial
//! counts.
//! May differ (host-side only): disk source paths, interface backend, graphics listen
//! address and port, serial/console output paths.

use crate::domain::{Device, Domain};

/// The target definition would change what the guest sees; one message per mismatch,
/// each `target X 'a' does not match source 'b'`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("target definition changes the guest ABI: {}", .0.join("; "))]
pub struct AbiError(pub Vec<String>);

fn kind(d: &Device) -> &'static str {
    match d {
        Device::Disk(_) => "disk",
        Device::Interface(_) => "interface",
        Device::Graphics(_) => "graphics",
        Device::Serial(_) => "serial",
        Device::Console(_) => "console",
    }
}

/// The guest-visible fields of a device, as (what, value) pairs.
fn guest_visible(d: &Device) -> Vec<(&'static str, String)> {
    match d {
        Device::Disk(d) => vec![
            ("disk bus", d.bus.clone()),
            ("disk target", d.target_dev.clone()),
            ("disk format", d.format.clone()),
            ("disk read-only", d.readonly.to_string()),
        ],
        Device::Interface(i) => vec![
            ("interface MAC", i.mac.clone()),
            ("interface model", i.model.clone()),
        ],
        Device::Graphics(_) => vec![("graphics type", "vnc".to_string())],
        Device::Serial(c) => vec![("serial port", c.port.to_string())],
        Device::Console(c) => vec![("console port", c.port.to_string())],
    }
}

fn count(d: &Domain, k: &str) -> usize {
    d.devices.iter().filter(|x| kind(x) == k).count()
}

/// One field that differs between two definitions: what, and its two values.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Difference {
    what: String,
    source: String,
    target: String,
}

/// The guest-visible fields in which `target` differs from `source`.
fn guest_visible_differences(source: &Domain, target: &Domain) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut cmp = |what: &str, t: String, s: String| {
        if t != s {
            out.push(Difference {
                what: what.to_string(),
                source: s,
                target: t,
            });
        }
    };
    cmp("name", target.name.clone(), source.name.clone());
    cmp("uuid", target.uuid.to_string(), source.uuid.to_string());
    cmp(
        "memory",
        format!("{} KiB", target.memory_kib),
        format!("{} KiB", source.memory_kib),
    );
    cmp(
        "vCPU count",
        target.vcpus.to_string(),
        source.vcpus.to_string(),
    );
    cmp("arch", target.os.arch.clone(), source.os.arch.clone());
    cmp(
        "machine type",
        target.os.machine.clone(),
        source.os.machine.clone(),
    );
    cmp("CPU mode", target.cpu.mode.clone(), source.cpu.mode.clone());
    cmp(
        "CPU model",
        target.cpu.model.clone().unwrap_or_default(),
        source.cpu.model.clone().unwrap_or_default(),
    );
    cmp(
        "features",
        target.features.join(","),
        source.features.join(","),
    );
    cmp(
        "device count",
        target.devices.len().to_string(),
        source.devices.len().to_string(),
    );
    for (i, (t, s)) in target.devices.iter().zip(&source.devices).enumerate() {
        if kind(t) != kind(s) {
            cmp(&format!("device {i}"), kind(t).into(), kind(s).into());
            continue;
        }
        for ((what, tv), (_, sv)) in guest_visible(t).into_iter().zip(guest_visible(s)) {
            cmp(what, tv, sv);
        }
    }
    for k in ["graphics", "serial"] {
        cmp(
            &format!("{k} count"),
            count(target, k).to_string(),
            count(source, k).to_string(),
        );
    }
    out
}

/// The host-side fields of a device (those a migration may change), as (what, value).
fn host_side(d: &Device) -> Vec<(&'static str, String)> {
    let or_default = |p: &Option<String>| p.clone().unwrap_or_else(|| "(default)".into());
    match d {
        Device::Disk(d) => vec![("disk source", d.source.clone())],
        Device::Interface(i) => vec![("interface backend", or_default(&i.backend))],
        Device::Graphics(g) => vec![
            ("graphics listen", g.listen.clone()),
            (
                "graphics port",
                g.port.map_or_else(|| "auto".into(), |p| p.to_string()),
            ),
        ],
        Device::Serial(c) => vec![("serial path", or_default(&c.path))],
        Device::Console(c) => vec![("console path", or_default(&c.path))],
    }
}

/// Compares `source` (running) with `target` (app-supplied); `Ok` when only host-side
/// details differ.
pub fn check(source: &Domain, target: &Domain) -> Result<(), AbiError> {
    let out: Vec<String> = guest_visible_differences(source, target)
        .into_iter()
        .map(|d| {
            format!(
                "target {} '{}' does not match source '{}'",
                d.what, d.target, d.source
            )
        })
        .collect();
    if out.is_empty() {
        Ok(())
    } else {
        Err(AbiError(out))
    }
}

/// Every difference between the definition a guest runs with (`running`) and a new one
/// (`new`), guest-visible or host-side, each `what 'old' → 'new'`; empty when they
/// describe the same guest on the same host.
pub fn changes(running: &Domain, new: &Domain) -> Vec<String> {
    let mut out = guest_visible_differences(running, new);
    if running.virt_type != new.virt_type {
        out.push(Difference {
            what: "domain type".into(),
            source: format!("{:?}", running.virt_type).to_lowercase(),
            target: format!("{:?}", new.virt_type).to_lowercase(),
        });
    }
    for (r, n) in running.devices.iter().zip(&new.devices) {
        if kind(r) != kind(n) {
            continue;
        }
        for ((what, rv), (_, nv)) in host_side(r).into_iter().zip(host_side(n)) {
            if rv != nv {
                out.push(Difference {
                    what: what.to_string(),
                    source: rv,
                    target: nv,
                });
            }
        }
    }
    out.into_iter()
        .map(|d| format!("{} '{}' → '{}'", d.what, d.source, d.target))
        .collect()
}

/// What a target may be handed for a guest, by what its owner wrote through the API
/// (the target trusts no definition the source node wrote).
#[derive(Debug, Clone, Copy)]
pub enum Expected<'a> {
    /// The migration's `spec.targetDomainXML`: exactly it.
    Exactly(&'a Domain),
    /// The VM's recorded running definition (`status.domainXML`), when there is no
    /// target definition: exactly it too.
    Running(&'a Domain),
    /// A guest started before its definition was recorded: the spec's, as far as the
    /// guest can tell (host-side details may differ, as an edit of the spec may have).
    Spec(&'a Domain),
}

/// The definition a target was handed is not the one its VM's owner asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the definition handed to the target is not {expected}: {}", .changes.join("; "))]
pub struct HandedError {
    /// What it should have been.
    pub expected: &'static str,
    /// Each difference, `what 'expected' → 'handed'`.
    pub changes: Vec<String>,
}

/// Checks `handed` (Begin's output, carried by the status or by the source agent)
/// against what the owner wrote.
pub fn check_handed(handed: &Domain, expected: Expected<'_>) -> Result<(), HandedError> {
    let (want, what, exact) = match expected {
        Expected::Exactly(d) => (d, "the migration's spec.targetDomainXML", true),
        Expected::Running(d) => (d, "the VM's running definition (status.domainXML)", true),
        Expected::Spec(d) => (d, "the VM's spec.domainXML", false),
    };
    let changes = if exact {
        changes(want, handed)
    } else {
        check(want, handed).err().map(|e| e.0).unwrap_or_default()
    };
    if changes.is_empty() {
        Ok(())
    } else {
        Err(HandedError {
            expected: what,
            changes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::tests::{SAMPLE, sample};

    fn target(xml: &str) -> Domain {
        Domain::parse(xml).unwrap()
    }

    #[test]
    fn host_side_changes_are_allowed() {
        let x = SAMPLE
            .replace("/var/lib/ferry/disks/guest-1.img", "/mnt/other/guest-1.img")
            .replace(
                "<model type='virtio'/>",
                "<model type='virtio'/><backend type='passt'/>",
            )
            .replace(
                "port='-1' autoport='yes' listen='127.0.0.1'",
                "port='5905' listen='0.0.0.0'",
            )
            .replace(
                "<serial type='file'>",
                "<serial type='file'><source path='/tmp/s.log'/>",
            );
        assert_eq!(check(&sample(), &target(&x)), Ok(()));
    }

    #[test]
    fn memory_mac_bus_and_added_device_are_refused() {
        let cases = [
            (
                SAMPLE.replace("'MiB'>256", "'MiB'>512"),
                "target memory '524288 KiB' does not match source '262144 KiB'",
            ),
            (
                SAMPLE.replace("AA:BB:01", "AA:BB:02"),
                "target interface MAC '52:54:00:aa:bb:02' does not match source '52:54:00:aa:bb:01'",
            ),
            (
                SAMPLE.replace("bus='ide'", "bus='virtio'"),
                "target disk bus 'virtio' does not match source 'ide'",
            ),
            (
                SAMPLE.replace("type='raw'", "type='qcow2'"),
                "target disk format 'qcow2' does not match source 'raw'",
            ),
            (
                SAMPLE.replace("bus='ide'/>", "bus='ide'/><readonly/>"),
                "target disk read-only 'true' does not match source 'false'",
            ),
            (
                SAMPLE.replace(
                    "</devices>",
                    "<serial type='file'><target port='1'/></serial></devices>",
                ),
                "target device count '5' does not match source '4'",
            ),
        ];
        for (xml, msg) in cases {
            let err = check(&sample(), &target(&xml)).unwrap_err();
            assert!(err.0.contains(&msg.to_string()), "{err}");
        }
    }

    #[test]
    fn changes_lists_every_difference_guest_visible_or_not() {
        assert_eq!(changes(&sample(), &sample()), Vec::<String>::new());
        let x = SAMPLE
            .replace("'MiB'>256", "'MiB'>512")
            .replace("/var/lib/ferry/disks/guest-1.img", "/mnt/other/guest-1.img");
        assert_eq!(
            changes(&sample(), &target(&x)),
            vec![
                "memory '262144 KiB' → '524288 KiB'".to_string(),
                "disk source '/var/lib/ferry/disks/guest-1.img' → '/mnt/other/guest-1.img'"
                    .to_string(),
            ]
        );
        let x = SAMPLE.replace("<name>", "<name>x-");
        let listed = changes(&sample(), &target(&x));
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert!(listed[0].starts_with("name '"), "{listed:?}");
    }

    #[test]
    fn reorder_and_counts() {
        let x = SAMPLE.replace(
            "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>\n    <serial type='file'><target port='0'/></serial>",
            "<serial type='file'><target port='0'/></serial><graphics type='vnc' autoport='yes'/>",
        );
        let err = check(&sample(), &target(&x)).unwrap_err();
        assert!(
            err.0
                .contains(&"target device 2 'serial' does not match source 'graphics'".to_string())
        );
        let x = SAMPLE.replace(
            "<graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>",
            "",
        );
        let err = check(&sample(), &target(&x)).unwrap_err();
        assert!(
            err.0
                .contains(&"target graphics count '0' does not match source '1'".to_string())
        );
        let x = SAMPLE.replace("7c5f6d2a", "00000000");
        let err = check(&sample(), &target(&x)).unwrap_err();
        assert!(err.to_string().contains("target uuid '00000000-3a8e"));
    }

    #[test]
    fn a_target_takes_only_what_the_owner_wrote() {
        let running = sample();
        assert_eq!(check_handed(&running, Expected::Running(&running)), Ok(()));
        let moved = target(&SAMPLE.replace("/var/lib/ferry/disks/guest-1.img", "/etc/shadow"));
        let err = check_handed(&moved, Expected::Running(&running)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the definition handed to the target is not the VM's running definition \
             (status.domainXML): disk source '/var/lib/ferry/disks/guest-1.img' → '/etc/shadow'"
        );
        // What the owner wrote as the target definition, exactly.
        assert_eq!(check_handed(&moved, Expected::Exactly(&moved)), Ok(()));
        let err = check_handed(&running, Expected::Exactly(&moved)).unwrap_err();
        assert!(
            err.to_string()
                .contains("not the migration's spec.targetDomainXML")
        );
        // Unrecorded: the spec's, up to host-side details; the guest must not change.
        assert_eq!(check_handed(&moved, Expected::Spec(&running)), Ok(()));
        let bigger = target(&SAMPLE.replace("'MiB'>256", "'MiB'>512"));
        let err = check_handed(&bigger, Expected::Spec(&running)).unwrap_err();
        assert!(
            err.to_string().contains("target memory '524288 KiB'"),
            "{err}"
        );
    }
}
