//! Unit tests of the domain XML subset (and the sample other modules test with).

use super::*;

pub const SAMPLE: &str = r#"<?xml version="1.0"?>
<domain type='qemu'>
  <name>guest-1</name>
  <uuid>7c5f6d2a-3a8e-4a57-9b0e-1d2c3b4a5f60</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/><apic/></features>
  <cpu mode='custom'><model>qemu64</model></cpu>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/ferry/disks/guest-1.img'/>
      <target dev='hda' bus='ide'/>
    </disk>
    <interface type='user'>
      <mac address='52:54:00:AA:BB:01'/>
      <model type='virtio'/>
    </interface>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>
    <serial type='file'><target port='0'/></serial>
  </devices>
</domain>"#;

pub fn sample() -> Domain {
    Domain::parse(SAMPLE).unwrap()
}

#[test]
fn parses_the_subset() {
    let d = sample();
    assert_eq!(d.name, "guest-1");
    assert_eq!(d.memory_kib, 256 * 1024);
    assert_eq!(d.vcpus, 1);
    assert_eq!(d.os.machine, "pc");
    assert_eq!(d.features, vec!["acpi", "apic"]);
    assert_eq!(d.devices.len(), 4);
    let Device::Interface(i) = &d.devices[1] else {
        panic!("not a nic")
    };
    assert_eq!(i.mac, "52:54:00:aa:bb:01");
    assert_eq!(d.graphics().unwrap().port, None);
}

#[test]
fn writes_back_what_it_reads() {
    let d = sample();
    let again = Domain::parse(&d.to_xml()).unwrap();
    assert_eq!(again, d);
}

fn refused(xml: &str) -> String {
    Domain::parse(xml).unwrap_err().to_string()
}

#[test]
fn refuses_outside_the_subset_naming_it() {
    let x = SAMPLE.replace("<vcpu>1</vcpu>", "<vcpu>1</vcpu><iothreads>2</iothreads>");
    assert_eq!(
        refused(&x),
        "domain XML: unsupported element <iothreads> in <domain>"
    );
    let x = SAMPLE.replace("<vcpu>", "<vcpu placement='static'>");
    assert_eq!(
        refused(&x),
        "domain XML: unsupported attribute 'placement' on <vcpu>"
    );
    let x = SAMPLE.replace("<serial type='file'>", "<hostdev/><serial type='file'>");
    assert_eq!(
        refused(&x),
        "domain XML: unsupported element <hostdev> in <devices>"
    );
    let x = SAMPLE.replace("type='user'", "type='bridge'");
    assert!(refused(&x).contains("only 'user' interfaces"));
    let x = SAMPLE.replace("bus='ide'", "bus='scsi'");
    assert!(refused(&x).contains("invalid value 'scsi' for bus in <target>"));
    let x = SAMPLE.replace("guest-1</name>", "../etc</name>");
    assert!(refused(&x).contains("'../etc'"));
    let x = SAMPLE.replace("52:54:00:AA:BB:01", "52:54:00:AA:BB");
    assert!(refused(&x).contains("xx:xx"));
}

#[test]
fn refuses_doctype_and_oversize() {
    let x = format!("<!DOCTYPE domain [<!ENTITY e 'x'>]>{}", &SAMPLE[22..]);
    assert!(refused(&x).contains("DOCTYPE"));
    let big = SAMPLE.replace("<vcpu>", &format!("<!--{}--><vcpu>", "x".repeat(70000)));
    assert!(refused(&big).contains("more than the limit"));
}

#[test]
fn memory_units() {
    let x = SAMPLE.replace("<memory unit='MiB'>256", "<memory unit='GiB'>1");
    assert_eq!(Domain::parse(&x).unwrap().memory_kib, 1 << 20);
    let x = SAMPLE.replace("<memory unit='MiB'>256", "<memory>4096");
    assert_eq!(Domain::parse(&x).unwrap().memory_kib, 4096);
    let x = SAMPLE.replace("unit='MiB'", "unit='parsecs'");
    assert!(refused(&x).contains("unknown unit"));
}
