//! The libvirt domain XML subset Ferry supports, parsed strictly and written back.
//!
//! Supported: `<domain type='qemu|kvm'>` with `name`, `uuid`, `memory` (+`unit`), `vcpu`,
//! `os/type` (`arch`, `machine`, text `hvm`), `features` (`acpi`, `apic`, `pae`),
//! `cpu` (`mode`, optional `model`), and `devices`: `disk type='file' device='disk'`
//! (`driver type`, `source file`, `target dev bus`, `readonly`), `interface type='user'` (`mac`,
//! `model`, `backend type`), `graphics type='vnc'` (`listen`, `port`, `autoport`),
//! `serial type='file'` and `console type='file'` (`source path`, `target port`).
//! Anything else is refused with an error naming the element or attribute.
//! The QEMU command line built from this model lives in [`crate::cmdline`].

use crate::xml::{self, Element, XmlError};
use uuid::Uuid;

/// Largest domain definition accepted, in bytes.
pub const MAX_DOMAIN_XML: usize = 64 * 1024;

/// A refused domain definition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("domain XML: {0}")]
pub struct DomainError(#[from] pub XmlError);

/// Which accelerator the guest asks for: `type='qemu'` is TCG, `type='kvm'` is KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VirtType {
    Qemu,
    Kvm,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Domain {
    pub virt_type: VirtType,
    pub name: String,
    pub uuid: Uuid,
    pub memory_kib: u64,
    pub vcpus: u32,
    pub os: Os,
    /// Enabled features (`acpi`, `apic`, `pae`), in document order.
    pub features: Vec<String>,
    pub cpu: Cpu,
    /// Devices in document order; the order is part of the guest ABI.
    pub devices: Vec<Device>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Os {
    pub arch: String,
    pub machine: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    /// `host-passthrough`, `maximum` or `custom`.
    pub mode: String,
    /// The CPU model for `custom`.
    pub model: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    Disk(Disk),
    Interface(Interface),
    Graphics(Graphics),
    Serial(CharDevice),
    Console(CharDevice),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Image format: `raw` or `qcow2`.
    pub format: String,
    /// Absolute path of the image (host-side: may differ between source and target).
    pub source: String,
    pub target_dev: String,
    /// `virtio` or `ide`.
    pub bus: String,
    /// `<readonly/>`: the guest sees a read-only disk, and the image may lie beneath a
    /// read-only storage root.
    pub readonly: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Lower-case `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    /// `virtio`, `e1000` or `rtl8139`.
    pub model: String,
    /// Host-side backend (`<backend type='...'/>`); may differ between source and target.
    pub backend: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graphics {
    pub listen: String,
    /// Fixed TCP port, or `None` for autoport.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CharDevice {
    /// Host-side output file; `None` lets the agent put it in the VM's state dir.
    pub path: Option<String>,
    pub port: u32,
}

const DISK_BUSES: &[&str] = &["virtio", "ide"];
const NIC_MODELS: &[&str] = &["virtio", "e1000", "rtl8139"];
const CPU_MODES: &[&str] = &["host-passthrough", "maximum", "custom"];
const FEATURES: &[&str] = &["acpi", "apic", "pae"];

/// Checks a VM name: it names directories, so only `[A-Za-z0-9_.-]`, 1 to 63 bytes,
/// not starting with a dot.
pub fn valid_vm_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn parse_mac(el: &Element, s: &str) -> Result<String, XmlError> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()))
    {
        return Err(el.invalid("address", s, "expected xx:xx:xx:xx:xx:xx"));
    }
    Ok(s.to_ascii_lowercase())
}

fn one_of(el: &Element, what: &str, value: &str, allowed: &[&str]) -> Result<String, XmlError> {
    if allowed.contains(&value) {
        Ok(value.to_string())
    } else {
        Err(el.invalid(what, value, format!("supported: {}", allowed.join(", "))))
    }
}

fn memory_kib(el: &Element) -> Result<u64, XmlError> {
    let text = el.text.trim();
    let value: u64 = text
        .parse()
        .map_err(|_| el.invalid("value", text, "not a number"))?;
    let unit = el.get("unit").unwrap_or("KiB");
    let factor_bytes: u64 = match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "M" | "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "G" | "GiB" => 1 << 30,
        _ => return Err(el.invalid("unit", unit, "unknown unit")),
    };
    let bytes = value
        .checked_mul(factor_bytes)
        .ok_or_else(|| el.invalid("value", text, "too large"))?;
    if bytes == 0 || bytes % 1024 != 0 {
        return Err(el.invalid("value", text, "must be a positive multiple of 1 KiB"));
    }
    Ok(bytes / 1024)
}

fn char_device(el: &Element) -> Result<CharDevice, XmlError> {
    el.allow(&["type"], &["source", "target"])?;
    let ty = el.require("type")?;
    if ty != "file" {
        return Err(el.invalid("type", ty, "only 'file' is supported"));
    }
    let path = match el.child("source")? {
        Some(s) => {
            s.allow(&["path"], &[])?;
            let p = s.require("path")?;
            if !p.starts_with('/') {
                return Err(s.invalid("path", p, "must be absolute"));
            }
            Some(p.to_string())
        }
        None => None,
    };
    let port = match el.child("target")? {
        Some(t) => {
            t.allow(&["port", "type"], &[])?;
            if let Some(ty) = t.get("type")
                && ty != "serial"
                && ty != "isa-serial"
            {
                return Err(t.invalid("type", ty, "only serial targets are supported"));
            }
            match t.get("port") {
                Some(p) => p
                    .parse()
                    .map_err(|_| t.invalid("port", p, "not a number"))?,
                None => 0,
            }
        }
        None => 0,
    };
    Ok(CharDevice { path, port })
}

fn device(el: &Element) -> Result<Device, XmlError> {
    match el.name.as_str() {
        "disk" => {
            el.allow(
                &["type", "device"],
                &["driver", "source", "target", "readonly"],
            )?;
            let ty = el.require("type")?;
            if ty != "file" {
                return Err(el.invalid("type", ty, "only 'file' disks are supported"));
            }
            if let Some(d) = el.get("device")
                && d != "disk"
            {
                return Err(el.invalid("device", d, "only 'disk' is supported"));
            }
            let driver = el.require_child("driver")?;
            driver.allow(&["name", "type"], &[])?;
            if let Some(n) = driver.get("name")
                && n != "qemu"
            {
                return Err(driver.invalid("name", n, "only 'qemu' is supported"));
            }
            let format = one_of(driver, "type", driver.require("type")?, &["raw", "qcow2"])?;
            let source = el.require_child("source")?;
            source.allow(&["file"], &[])?;
            let file = source.require("file")?;
            if !file.starts_with('/') {
                return Err(source.invalid("file", file, "must be absolute"));
            }
            let target = el.require_child("target")?;
            target.allow(&["dev", "bus"], &[])?;
            let dev = target.require("dev")?;
            if dev.is_empty() || !dev.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(target.invalid("dev", dev, "expected a name like 'vda'"));
            }
            let bus = one_of(target, "bus", target.require("bus")?, DISK_BUSES)?;
            let readonly = match el.child("readonly")? {
                Some(r) => {
                    r.allow(&[], &[])?;
                    true
                }
                None => false,
            };
            Ok(Device::Disk(Disk {
                format,
                source: file.to_string(),
                target_dev: dev.to_string(),
                bus,
                readonly,
            }))
        }
        "interface" => {
            el.allow(&["type"], &["mac", "model", "backend"])?;
            let ty = el.require("type")?;
            if ty != "user" {
                return Err(el.invalid("type", ty, "only 'user' interfaces are supported"));
            }
            let mac_el = el.require_child("mac")?;
            mac_el.allow(&["address"], &[])?;
            let mac = parse_mac(mac_el, mac_el.require("address")?)?;
            let model_el = el.require_child("model")?;
            model_el.allow(&["type"], &[])?;
            let model = one_of(model_el, "type", model_el.require("type")?, NIC_MODELS)?;
            let backend = match el.child("backend")? {
                Some(b) => {
                    b.allow(&["type"], &[])?;
                    Some(b.require("type")?.to_string())
                }
                None => None,
            };
            Ok(Device::Interface(Interface {
                mac,
                model,
                backend,
            }))
        }
        "graphics" => {
            el.allow(&["type", "port", "autoport", "listen"], &[])?;
            let ty = el.require("type")?;
            if ty != "vnc" {
                return Err(el.invalid("type", ty, "only 'vnc' is supported"));
            }
            let autoport = match el.get("autoport") {
                None => false,
                Some("yes") => true,
                Some("no") => false,
                Some(v) => return Err(el.invalid("autoport", v, "expected yes or no")),
            };
            let port = match el.get("port") {
                Some("-1") | None => None,
                Some(p) => {
                    let p: u16 = p.parse().map_err(|_| el.invalid("port", p, "not a port"))?;
                    if p < 5900 {
                        return Err(el.invalid("port", &p.to_string(), "must be 5900 or more"));
                    }
                    Some(p)
                }
            };
            if port.is_none() && !autoport {
                return Err(el.invalid("port", "-1", "a port or autoport='yes' is needed"));
            }
            let listen = el.get("listen").unwrap_or("127.0.0.1");
            if listen.parse::<std::net::IpAddr>().is_err() {
                return Err(el.invalid("listen", listen, "not an IP address"));
            }
            Ok(Device::Graphics(Graphics {
                listen: listen.to_string(),
                port: if autoport { None } else { port },
            }))
        }
        "serial" => Ok(Device::Serial(char_device(el)?)),
        "console" => Ok(Device::Console(char_device(el)?)),
        other => Err(XmlError::UnsupportedElement {
            element: other.to_string(),
            parent: "devices".to_string(),
        }),
    }
}

impl Domain {
    /// Parses a domain definition, refusing anything outside the supported subset.
    pub fn parse(input: &str) -> Result<Domain, DomainError> {
        let root = xml::parse(input, MAX_DOMAIN_XML)?;
        if root.name != "domain" {
            return Err(XmlError::UnsupportedElement {
                element: root.name.clone(),
                parent: "document".to_string(),
            }
            .into());
        }
        root.allow(
            &["type"],
            &[
                "name", "uuid", "memory", "vcpu", "os", "features", "cpu", "devices",
            ],
        )?;
        let virt_type = match root.require("type")? {
            "qemu" => VirtType::Qemu,
            "kvm" => VirtType::Kvm,
            t => return Err(root.invalid("type", t, "expected qemu or kvm").into()),
        };
        let leaf = |name: &str| -> Result<&Element, XmlError> {
            let el = root.require_child(name)?;
            el.allow(&[], &[])?;
            Ok(el)
        };
        let name_el = leaf("name")?;
        let name = name_el.text.trim().to_string();
        if !valid_vm_name(&name) {
            return Err(name_el
                .invalid(
                    "name",
                    &name,
                    "use 1-63 of [A-Za-z0-9_.-], not starting with '.'",
                )
                .into());
        }
        let uuid_el = leaf("uuid")?;
        let uuid = Uuid::parse_str(uuid_el.text.trim())
            .map_err(|e| uuid_el.invalid("uuid", uuid_el.text.trim(), e))?;
        let memory = root.require_child("memory")?;
        memory.allow(&["unit"], &[])?;
        let memory_kib = memory_kib(memory)?;
        let vcpu_el = leaf("vcpu")?;
        let vcpus: u32 = vcpu_el
            .text
            .trim()
            .parse()
            .ok()
            .filter(|n| (1..=255).contains(n))
            .ok_or_else(|| vcpu_el.invalid("count", vcpu_el.text.trim(), "expected 1-255"))?;
        let os_el = root.require_child("os")?;
        os_el.allow(&[], &["type"])?;
        let ty = os_el.require_child("type")?;
        ty.allow(&["arch", "machine"], &[])?;
        if ty.text.trim() != "hvm" {
            return Err(ty.invalid("os type", ty.text.trim(), "only 'hvm'").into());
        }
        let os = Os {
            arch: one_of(ty, "arch", ty.require("arch")?, &["x86_64"])?,
            machine: ty.require("machine")?.to_string(),
        };
        if os.machine.is_empty() || os.machine.contains([',', '=']) {
            return Err(ty
                .invalid("machine", &os.machine, "not a machine type")
                .into());
        }
        let mut features = Vec::new();
        if let Some(f) = root.child("features")? {
            f.allow(&[], FEATURES)?;
            for c in &f.children {
                c.allow(&[], &[])?;
                features.push(c.name.clone());
            }
        }
        let cpu = match root.child("cpu")? {
            Some(c) => {
                c.allow(&["mode"], &["model"])?;
                let mode = one_of(c, "mode", c.get("mode").unwrap_or("custom"), CPU_MODES)?;
                let model = match c.child("model")? {
                    Some(m) => {
                        m.allow(&[], &[])?;
                        Some(m.text.trim().to_string())
                    }
                    None => None,
                };
                if let Some(m) = &model
                    && (m.is_empty() || m.contains(','))
                {
                    return Err(c.invalid("model", m, "not a CPU model").into());
                }
                if mode == "custom" && model.is_none() {
                    return Err(c.invalid("mode", "custom", "needs a <model>").into());
                }
                Cpu { mode, model }
            }
            None => Cpu {
                mode: "custom".into(),
                model: Some("qemu64".into()),
            },
        };
        let mut devices = Vec::new();
        if let Some(d) = root.child("devices")? {
            for c in &d.children {
                devices.push(device(c)?);
            }
        }
        Ok(Domain {
            virt_type,
            name,
            uuid,
            memory_kib,
            vcpus,
            os,
            features,
            cpu,
            devices,
        })
    }

    /// Writes the definition back as libvirt-format XML (memory in KiB).
    pub fn to_xml(&self) -> String {
        let mut features = Element::new("features");
        for f in &self.features {
            features = features.with_child(Element::new(f.as_str()));
        }
        let mut cpu = Element::new("cpu").with_attr("mode", &self.cpu.mode);
        if let Some(m) = &self.cpu.model {
            cpu = cpu.with_child(Element::new("model").with_text(m));
        }
        let mut devices = Element::new("devices");
        for d in &self.devices {
            devices = devices.with_child(device_element(d));
        }
        let root = Element::new("domain")
            .with_attr(
                "type",
                match self.virt_type {
                    VirtType::Qemu => "qemu",
                    VirtType::Kvm => "kvm",
                },
            )
            .with_child(Element::new("name").with_text(&self.name))
            .with_child(Element::new("uuid").with_text(self.uuid))
            .with_child(
                Element::new("memory")
                    .with_attr("unit", "KiB")
                    .with_text(self.memory_kib),
            )
            .with_child(Element::new("vcpu").with_text(self.vcpus))
            .with_child(
                Element::new("os").with_child(
                    Element::new("type")
                        .with_attr("arch", &self.os.arch)
                        .with_attr("machine", &self.os.machine)
                        .with_text("hvm"),
                ),
            )
            .with_child(features)
            .with_child(cpu)
            .with_child(devices);
        root.write()
    }

    /// The disks, in device order.
    pub fn disks(&self) -> impl Iterator<Item = &Disk> {
        self.devices.iter().filter_map(|d| match d {
            Device::Disk(d) => Some(d),
            _ => None,
        })
    }

    /// The VNC graphics device, if any.
    pub fn graphics(&self) -> Option<&Graphics> {
        self.devices.iter().find_map(|d| match d {
            Device::Graphics(g) => Some(g),
            _ => None,
        })
    }
}

fn char_element(name: &str, c: &CharDevice) -> Element {
    let mut el = Element::new(name).with_attr("type", "file");
    if let Some(p) = &c.path {
        el = el.with_child(Element::new("source").with_attr("path", p));
    }
    el.with_child(Element::new("target").with_attr("port", c.port))
}

fn device_element(d: &Device) -> Element {
    match d {
        Device::Disk(d) => {
            let el = Element::new("disk")
                .with_attr("type", "file")
                .with_attr("device", "disk")
                .with_child(
                    Element::new("driver")
                        .with_attr("name", "qemu")
                        .with_attr("type", &d.format),
                )
                .with_child(Element::new("source").with_attr("file", &d.source))
                .with_child(
                    Element::new("target")
                        .with_attr("dev", &d.target_dev)
                        .with_attr("bus", &d.bus),
                );
            if d.readonly {
                el.with_child(Element::new("readonly"))
            } else {
                el
            }
        }
        Device::Interface(i) => {
            let mut el = Element::new("interface")
                .with_attr("type", "user")
                .with_child(Element::new("mac").with_attr("address", &i.mac))
                .with_child(Element::new("model").with_attr("type", &i.model));
            if let Some(b) = &i.backend {
                el = el.with_child(Element::new("backend").with_attr("type", b));
            }
            el
        }
        Device::Graphics(g) => {
            let el = Element::new("graphics").with_attr("type", "vnc");
            match g.port {
                Some(p) => el.with_attr("port", p).with_attr("autoport", "no"),
                None => el.with_attr("port", "-1").with_attr("autoport", "yes"),
            }
            .with_attr("listen", &g.listen)
        }
        Device::Serial(c) => char_element("serial", c),
        Device::Console(c) => char_element("console", c),
    }
}

#[cfg(test)]
#[path = "domain_tests.rs"]
pub(crate) mod tests;
