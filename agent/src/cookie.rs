//! The migration cookie: a small XML document each phase hands to the next through the
//! migration's status.
//!
//! ```xml
//! <ferry-migration version='1'>
//!   <name>guest-1</name>
//!   <uuid>...</uuid>
//!   <hostname>node-a</hostname>
//!   <hostuuid>...</hostuuid>
//!   <graphics type='vnc' listen='127.0.0.1' port='5901'/>
//!   <lockstate holder='node-a'><disk path='/disks/guest-1.img'/></lockstate>
//!   <statistics total-time-ms='..' downtime-ms='..' setup-time-ms='..'
//!               transferred-bytes='..' total-bytes='..' passes='..'
//!               stopped-at-ms='..' resumed-at-ms='..'/>
//! </ferry-migration>
//! ```
//!
//! Identity (guest name and uuid, writer's host name and uuid) is always present; which
//! optional part a phase may write is [`parts_written_by`]. An unknown element marked
//! `mandatory='yes'` is refused; other unknown elements are ignored (forward compatible).

use crate::phases::Phase;
pub use crate::statistics::Statistics;
use crate::xml::{self, Element, XmlError};
use uuid::Uuid;

/// Largest encoded cookie, in bytes (the size of a cookie field in the migration status).
pub const MAX_COOKIE: usize = 16384;
const ROOT: &str = "ferry-migration";
const VERSION: &str = "1";

/// The optional parts of a cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookiePart {
    /// Where console clients connect on the writer's side (Prepare: the new QEMU's VNC).
    Graphics,
    /// Which disks are locked and which node holds them.
    LockState,
    /// Migration statistics.
    Statistics,
}

/// Which optional parts each phase writes (identity is always written).
pub fn parts_written_by(phase: Phase) -> &'static [CookiePart] {
    match phase {
        Phase::Begin => &[CookiePart::LockState],
        Phase::Prepare => &[CookiePart::Graphics],
        Phase::Perform => &[CookiePart::Statistics],
        Phase::Finish => &[CookiePart::LockState, CookiePart::Statistics],
        Phase::Confirm => &[],
    }
}

/// A refused cookie.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CookieError {
    #[error("migration cookie: {0}")]
    Xml(#[from] XmlError),
    #[error("migration cookie is {len} bytes encoded, more than the limit of {MAX_COOKIE}")]
    TooLarge { len: usize },
    #[error("migration cookie: unknown root <{0}>, expected <{ROOT}>")]
    Root(String),
    #[error("migration cookie: unsupported version '{0}'")]
    Version(String),
    #[error("migration cookie: unknown mandatory part <{0}>")]
    UnknownMandatory(String),
    #[error("migration cookie: {what} '{got}' does not match the VM's '{expected}'")]
    WrongVm {
        what: &'static str,
        expected: String,
        got: String,
    },
    #[error("migration cookie: attempt to migrate guest to the same host {0}")]
    SameHost(Uuid),
    #[error("migration cookie: phase {phase} does not write part {part:?}")]
    UnexpectedPart { phase: Phase, part: CookiePart },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphicsInfo {
    pub kind: String,
    pub listen: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockState {
    /// Node name holding the disk lock.
    pub holder: String,
    /// Disk source paths under the lock.
    pub disks: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cookie {
    pub vm_name: String,
    pub vm_uuid: Uuid,
    /// The writer's node name.
    pub host_name: String,
    /// The writer's host uuid.
    pub host_uuid: Uuid,
    pub graphics: Option<GraphicsInfo>,
    pub lock: Option<LockState>,
    pub statistics: Option<Statistics>,
}

/// What the receiver knows and checks a cookie against.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub vm_name: &'a str,
    pub vm_uuid: Uuid,
    /// The phase that wrote the cookie.
    pub writer: Phase,
    /// The receiver's own host uuid: a cookie from it is refused.
    pub own_host_uuid: Uuid,
}

impl Cookie {
    /// A cookie with only the identity part.
    pub fn new(vm_name: &str, vm_uuid: Uuid, host_name: &str, host_uuid: Uuid) -> Cookie {
        Cookie {
            vm_name: vm_name.to_string(),
            vm_uuid,
            host_name: host_name.to_string(),
            host_uuid,
            graphics: None,
            lock: None,
            statistics: None,
        }
    }

    fn parts(&self) -> Vec<CookiePart> {
        let mut v = Vec::new();
        if self.graphics.is_some() {
            v.push(CookiePart::Graphics);
        }
        if self.lock.is_some() {
            v.push(CookiePart::LockState);
        }
        if self.statistics.is_some() {
            v.push(CookiePart::Statistics);
        }
        v
    }

    /// Encodes the cookie written by `phase`; refuses parts that phase does not write and
    /// an encoding over [`MAX_COOKIE`].
    pub fn encode(&self, phase: Phase) -> Result<String, CookieError> {
        check_parts(phase, &self.parts())?;
        let mut root = Element::new(ROOT)
            .with_attr("version", VERSION)
            .with_child(Element::new("name").with_text(&self.vm_name))
            .with_child(Element::new("uuid").with_text(self.vm_uuid))
            .with_child(Element::new("hostname").with_text(&self.host_name))
            .with_child(Element::new("hostuuid").with_text(self.host_uuid));
        if let Some(g) = &self.graphics {
            root = root.with_child(
                Element::new("graphics")
                    .with_attr("type", &g.kind)
                    .with_attr("listen", &g.listen)
                    .with_attr("port", g.port),
            );
        }
        if let Some(l) = &self.lock {
            let mut el = Element::new("lockstate").with_attr("holder", &l.holder);
            for d in &l.disks {
                el = el.with_child(Element::new("disk").with_attr("path", d));
            }
            root = root.with_child(el);
        }
        if let Some(s) = &self.statistics {
            root = root.with_child(
                Element::new("statistics")
                    .with_attr("total-time-ms", s.total_time_ms)
                    .with_attr("downtime-ms", s.downtime_ms)
                    .with_attr("setup-time-ms", s.setup_time_ms)
                    .with_attr("transferred-bytes", s.transferred_bytes)
                    .with_attr("total-bytes", s.total_bytes)
                    .with_attr("passes", s.passes)
                    .with_attr_opt("stopped-at-ms", s.stopped_at_ms)
                    .with_attr_opt("resumed-at-ms", s.resumed_at_ms),
            );
        }
        let out = root.write();
        if out.len() > MAX_COOKIE {
            return Err(CookieError::TooLarge { len: out.len() });
        }
        Ok(out)
    }

    /// Parses and checks a cookie against what the receiver knows.
    pub fn decode(input: &str, expect: &Expect<'_>) -> Result<Cookie, CookieError> {
        if input.len() > MAX_COOKIE {
            return Err(CookieError::TooLarge { len: input.len() });
        }
        let root = xml::parse(input, MAX_COOKIE)?;
        if root.name != ROOT {
            return Err(CookieError::Root(root.name));
        }
        root.allow(&["version"], KNOWN).or_else(|e| match e {
            XmlError::UnsupportedElement { .. } => Ok(()),
            e => Err(e),
        })?;
        let version = root.require("version")?;
        if version != VERSION {
            return Err(CookieError::Version(version.to_string()));
        }
        for c in &root.children {
            if !KNOWN.contains(&c.name.as_str()) && c.get("mandatory") == Some("yes") {
                return Err(CookieError::UnknownMandatory(c.name.clone()));
            }
        }
        let text = |name: &str| -> Result<String, XmlError> {
            let el = root.require_child(name)?;
            el.allow(&[], &[])?;
            Ok(el.text.trim().to_string())
        };
        let uuid = |name: &str| -> Result<Uuid, XmlError> {
            let s = text(name)?;
            Uuid::parse_str(&s).map_err(|e| XmlError::Invalid {
                element: name.to_string(),
                what: "uuid".to_string(),
                value: s,
                reason: e.to_string(),
            })
        };
        let mut cookie = Cookie::new(
            &text("name")?,
            uuid("uuid")?,
            &text("hostname")?,
            uuid("hostuuid")?,
        );
        if cookie.vm_name != expect.vm_name {
            return Err(CookieError::WrongVm {
                what: "guest name",
                expected: expect.vm_name.to_string(),
                got: cookie.vm_name,
            });
        }
        if cookie.vm_uuid != expect.vm_uuid {
            return Err(CookieError::WrongVm {
                what: "guest uuid",
                expected: expect.vm_uuid.to_string(),
                got: cookie.vm_uuid.to_string(),
            });
        }
        if cookie.host_uuid == expect.own_host_uuid {
            return Err(CookieError::SameHost(cookie.host_uuid));
        }
        if let Some(g) = root.child("graphics")? {
            g.allow(&["type", "listen", "port"], &[])?;
            let port = g.require("port")?;
            let listen = g.require("listen")?;
            if listen.parse::<std::net::IpAddr>().is_err() {
                return Err(g.invalid("listen", listen, "not an IP address").into());
            }
            cookie.graphics = Some(GraphicsInfo {
                kind: g.require("type")?.to_string(),
                listen: listen.to_string(),
                port: port
                    .parse()
                    .map_err(|_| g.invalid("port", port, "not a port"))?,
            });
        }
        if let Some(l) = root.child("lockstate")? {
            l.allow(&["holder"], &["disk"])?;
            let mut disks = Vec::new();
            for d in &l.children {
                d.allow(&["path"], &[])?;
                disks.push(d.require("path")?.to_string());
            }
            cookie.lock = Some(LockState {
                holder: l.require("holder")?.to_string(),
                disks,
            });
        }
        if let Some(s) = root.child("statistics")? {
            const ATTRS: [&str; 8] = [
                "total-time-ms",
                "downtime-ms",
                "setup-time-ms",
                "transferred-bytes",
                "total-bytes",
                "passes",
                "stopped-at-ms",
                "resumed-at-ms",
            ];
            s.allow(&ATTRS, &[])?;
            let opt = |k: &str| -> Result<Option<u64>, XmlError> {
                s.get(k)
                    .map(|v| v.parse().map_err(|_| s.invalid(k, v, "not a number")))
                    .transpose()
            };
            let n = |k: &str| opt(k).map(Option::unwrap_or_default);
            cookie.statistics = Some(Statistics {
                total_time_ms: n(ATTRS[0])?,
                downtime_ms: n(ATTRS[1])?,
                setup_time_ms: n(ATTRS[2])?,
                transferred_bytes: n(ATTRS[3])?,
                total_bytes: n(ATTRS[4])?,
                passes: n(ATTRS[5])?,
                stopped_at_ms: opt(ATTRS[6])?,
                resumed_at_ms: opt(ATTRS[7])?,
            });
        }
        check_parts(expect.writer, &cookie.parts())?;
        Ok(cookie)
    }
}

const KNOWN: &[&str] = &[
    "name",
    "uuid",
    "hostname",
    "hostuuid",
    "graphics",
    "lockstate",
    "statistics",
];

fn check_parts(phase: Phase, parts: &[CookiePart]) -> Result<(), CookieError> {
    let allowed = parts_written_by(phase);
    match parts.iter().find(|p| !allowed.contains(p)) {
        Some(&part) => Err(CookieError::UnexpectedPart { phase, part }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: Uuid = Uuid::from_u128(0x7c5f6d2a_3a8e_4a57_9b0e_1d2c3b4a5f60);
    const SRC: Uuid = Uuid::from_u128(1);
    const DST: Uuid = Uuid::from_u128(2);

    fn expect(writer: Phase, own: Uuid) -> Expect<'static> {
        Expect {
            vm_name: "guest-1",
            vm_uuid: VM,
            writer,
            own_host_uuid: own,
        }
    }

    fn begin_cookie() -> Cookie {
        let mut c = Cookie::new("guest-1", VM, "node-a", SRC);
        c.lock = Some(LockState {
            holder: "node-a".into(),
            disks: vec!["/disks/g.img".into()],
        });
        c
    }

    #[test]
    fn round_trip_each_part() {
        let c = begin_cookie();
        let xml = c.encode(Phase::Begin).unwrap();
        assert_eq!(Cookie::decode(&xml, &expect(Phase::Begin, DST)).unwrap(), c);
        let mut p = Cookie::new("guest-1", VM, "node-b", DST);
        p.graphics = Some(GraphicsInfo {
            kind: "vnc".into(),
            listen: "127.0.0.3".into(),
            port: 5901,
        });
        let xml = p.encode(Phase::Prepare).unwrap();
        assert_eq!(
            Cookie::decode(&xml, &expect(Phase::Prepare, SRC)).unwrap(),
            p
        );
        let mut s = Cookie::new("guest-1", VM, "node-a", SRC);
        s.statistics = Some(Statistics {
            total_time_ms: 1200,
            downtime_ms: 30,
            transferred_bytes: 1 << 28,
            stopped_at_ms: Some(1_764_000_000_000),
            ..Default::default()
        });
        let xml = s.encode(Phase::Perform).unwrap();
        assert_eq!(
            Cookie::decode(&xml, &expect(Phase::Perform, DST)).unwrap(),
            s
        );
    }

    #[test]
    fn phase_writes_only_its_parts() {
        let err = begin_cookie().encode(Phase::Prepare).unwrap_err();
        assert_eq!(
            err,
            CookieError::UnexpectedPart {
                phase: Phase::Prepare,
                part: CookiePart::LockState
            }
        );
        let xml = begin_cookie().encode(Phase::Begin).unwrap();
        assert!(Cookie::decode(&xml, &expect(Phase::Prepare, DST)).is_err());
    }

    #[test]
    fn same_host_refused() {
        let xml = begin_cookie().encode(Phase::Begin).unwrap();
        let err = Cookie::decode(&xml, &expect(Phase::Begin, SRC)).unwrap_err();
        assert!(
            err.to_string()
                .contains("attempt to migrate guest to the same host")
        );
    }

    #[test]
    fn strict_parsing() {
        let good = begin_cookie().encode(Phase::Begin).unwrap();
        let e = expect(Phase::Begin, DST);
        // Too large.
        let big = good.replace(
            "</ferry-migration>",
            &format!("<!--{}--></ferry-migration>", "x".repeat(MAX_COOKIE)),
        );
        assert!(matches!(
            Cookie::decode(&big, &e),
            Err(CookieError::TooLarge { .. })
        ));
        // Malformed.
        let err = Cookie::decode("<ferry-migration version='1'><name>", &e).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("migration cookie: malformed XML"),
            "{err}"
        );
        // Wrong uuid and name.
        let wrong = good.replace("7c5f6d2a", "00000000");
        assert!(
            Cookie::decode(&wrong, &e)
                .unwrap_err()
                .to_string()
                .contains("guest uuid")
        );
        let wrong = good.replace("guest-1", "guest-2");
        assert!(
            Cookie::decode(&wrong, &e)
                .unwrap_err()
                .to_string()
                .contains("guest name 'guest-2'")
        );
        // Unknown mandatory element refused, unknown optional ignored.
        let m = good.replace(
            "</ferry-migration>",
            "<nbd mandatory='yes'/></ferry-migration>",
        );
        assert_eq!(
            Cookie::decode(&m, &e).unwrap_err(),
            CookieError::UnknownMandatory("nbd".into())
        );
        let o = good.replace("</ferry-migration>", "<hint/></ferry-migration>");
        assert!(Cookie::decode(&o, &e).is_ok());
        // Unknown attribute on a known part, wrong root, DTD.
        let a = good.replace("holder=", "evil='1' holder=");
        assert!(
            Cookie::decode(&a, &e)
                .unwrap_err()
                .to_string()
                .contains("'evil'")
        );
        assert!(matches!(
            Cookie::decode("<migration/>", &e),
            Err(CookieError::Root(_))
        ));
        let dtd = format!("<!DOCTYPE x>{good}");
        assert!(
            Cookie::decode(&dtd, &e)
                .unwrap_err()
                .to_string()
                .contains("DOCTYPE")
        );
    }

    /// Issue 7's catalogue, the cookie side: each refused with a message naming the problem.
    #[test]
    fn hostile_cookies_are_refused_naming_the_problem() {
        let good = begin_cookie().encode(Phase::Begin).unwrap();
        let e = expect(Phase::Begin, DST);
        // A cookie for another VM (a replayed or forged one).
        let other = Cookie::new("guest-2", Uuid::from_u128(9), "node-a", SRC);
        let xml = other.encode(Phase::Finish).unwrap();
        assert_eq!(
            Cookie::decode(&xml, &expect(Phase::Finish, DST))
                .unwrap_err()
                .to_string(),
            "migration cookie: guest name 'guest-2' does not match the VM's 'guest-1'"
        );
        let other = Cookie::new("guest-1", Uuid::from_u128(9), "node-a", SRC);
        let xml = other.encode(Phase::Finish).unwrap();
        assert_eq!(
            Cookie::decode(&xml, &expect(Phase::Finish, DST))
                .unwrap_err()
                .to_string(),
            format!(
                "migration cookie: guest uuid '{}' does not match the VM's '{VM}'",
                Uuid::from_u128(9)
            )
        );
        // Oversize: refused before parsing, naming size and limit.
        let big = format!("{good}{}", " ".repeat(MAX_COOKIE));
        assert_eq!(
            Cookie::decode(&big, &e).unwrap_err().to_string(),
            format!(
                "migration cookie is {} bytes encoded, more than the limit of 16384",
                big.len()
            )
        );
        // Entity tricks.
        let laughs = format!(
            "<!DOCTYPE ferry-migration [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b '&a;&a;&a;&a;&a;'>]>{}",
            good.replace("node-a</hostname>", "&b;</hostname>")
        );
        let xxe = format!(
            "<!DOCTYPE ferry-migration [<!ENTITY x SYSTEM 'file:///etc/passwd'>]>{}",
            good.replace("node-a</hostname>", "&x;</hostname>")
        );
        for doc in [laughs, xxe] {
            assert_eq!(
                Cookie::decode(&doc, &e).unwrap_err().to_string(),
                "migration cookie: DTD and entity declarations (<!DOCTYPE ...>) are not accepted"
            );
        }
        let undeclared = good.replace("holder='node-a'", "holder='&x;'");
        assert_eq!(
            Cookie::decode(&undeclared, &e).unwrap_err().to_string(),
            "migration cookie: entity reference '&x;' is not accepted"
        );
        // Malformed and control characters.
        assert!(
            Cookie::decode(&good[..good.len() / 2], &e)
                .unwrap_err()
                .to_string()
                .starts_with("migration cookie: malformed XML")
        );
        let ctl = good.replace("node-a</hostname>", "node-a\u{1b}[2J</hostname>");
        assert_eq!(
            Cookie::decode(&ctl, &e).unwrap_err().to_string(),
            "migration cookie: malformed XML: character U+001B is not allowed in XML"
        );
    }

    #[test]
    fn graphics_listen_must_be_an_ip_address() {
        // Found by the cookie_decode fuzz target: any text was accepted as the address
        // console clients are sent to.
        let mut p = Cookie::new("guest-1", VM, "node-b", DST);
        p.graphics = Some(GraphicsInfo {
            kind: "vnc".into(),
            listen: "127.0.0.3".into(),
            port: 5901,
        });
        let xml = p.encode(Phase::Prepare).unwrap();
        let e = expect(Phase::Prepare, SRC);
        assert!(Cookie::decode(&xml, &e).is_ok());
        let bad = xml.replace("127.0.0.3", "evil.example");
        let err = Cookie::decode(&bad, &e).unwrap_err().to_string();
        assert!(
            err.contains("invalid value 'evil.example' for listen"),
            "{err}"
        );
    }

    #[test]
    fn encode_refuses_oversize() {
        let mut c = begin_cookie();
        c.lock.as_mut().unwrap().disks = (0..1000).map(|i| format!("/disks/{i:040}.img")).collect();
        assert!(matches!(
            c.encode(Phase::Begin),
            Err(CookieError::TooLarge { .. })
        ));
    }
}
