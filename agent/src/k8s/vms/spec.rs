//! What `spec.domainXML` is to a running guest, and the conditions that say it: a
//! running guest keeps the definition it started with (`status.domainXML`), so a
//! changed spec is either pending for the next start (`RestartRequired`) or cannot
//! apply (`DomainRefused`: it does not parse, or it renames the guest or changes its
//! uuid). Pure, tested on its own.

use ferry_agent::abi;
use ferry_agent::domain::{Domain, DomainError};
use ferry_crds::conditions::vm::{DOMAIN_REFUSED, RESTART_REQUIRED, SHUTTING_DOWN};
use ferry_crds::{Condition, set_condition};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// What `spec.domainXML` is to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecCheck {
    /// It parses and is what the guest runs with (or no guest runs).
    Current,
    /// It parses and differs from what the running guest started with: each change.
    Changed(Vec<String>),
    /// It renames the running guest or changes its uuid: each such change.
    IdentityChanged(Vec<String>),
    /// It does not parse, or asks for something unsupported: the parser's message.
    Invalid(String),
}

/// What the spec is to the guest that runs with `running` (`None`: no guest runs).
pub fn check(running: Option<&Domain>, spec: Result<&Domain, &DomainError>) -> SpecCheck {
    let spec = match spec {
        Ok(spec) => spec,
        Err(e) => return SpecCheck::Invalid(e.to_string()),
    };
    let Some(running) = running else {
        return SpecCheck::Current;
    };
    let mut identity = Vec::new();
    if spec.name != running.name {
        identity.push(format!("name '{}' → '{}'", running.name, spec.name));
    }
    if spec.uuid != running.uuid {
        identity.push(format!("uuid '{}' → '{}'", running.uuid, spec.uuid));
    }
    if !identity.is_empty() {
        return SpecCheck::IdentityChanged(identity);
    }
    let changes = abi::changes(running, spec);
    if changes.is_empty() {
        SpecCheck::Current
    } else {
        SpecCheck::Changed(changes)
    }
}

/// Why a spec cannot apply to the running guest (the `DomainRefused` reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    InvalidDomain,
    IdentityChanged,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::InvalidDomain => "InvalidDomain",
            Refusal::IdentityChanged => "IdentityChanged",
        }
    }

    fn parse(reason: &str) -> Option<Refusal> {
        [Refusal::InvalidDomain, Refusal::IdentityChanged]
            .into_iter()
            .find(|r| r.as_str() == reason)
    }
}

/// What the VM's conditions say about its spec.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SpecNote {
    /// Nothing: the spec is what the guest runs with (or no guest runs).
    #[default]
    None,
    /// `RestartRequired` True (reason `DomainChanged`) with this message.
    RestartRequired(String),
    /// `DomainRefused` True with this reason and message.
    Refused { reason: Refusal, message: String },
}

impl SpecNote {
    /// The note for a running guest whose spec is `check`.
    pub fn for_running(check: &SpecCheck) -> SpecNote {
        match check {
            SpecCheck::Current => SpecNote::None,
            SpecCheck::Changed(changes) => SpecNote::RestartRequired(format!(
                "spec.domainXML differs from the definition the guest runs with ({}); it \
                 applies when the guest is stopped and started again",
                changes.join("; ")
            )),
            SpecCheck::IdentityChanged(changes) => SpecNote::Refused {
                reason: Refusal::IdentityChanged,
                message: format!(
                    "spec.domainXML changes the running guest's identity ({}): not applied \
                     while it runs; the guest keeps the definition it started with",
                    changes.join("; ")
                ),
            },
            SpecCheck::Invalid(why) => SpecNote::Refused {
                reason: Refusal::InvalidDomain,
                message: format!(
                    "spec.domainXML is refused: {why}; the guest keeps running with the \
                     definition it started with"
                ),
            },
        }
    }

    /// The note `conditions` carry.
    pub fn of(conditions: &[Condition]) -> SpecNote {
        let true_one = |type_: &str| {
            conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == "True")
        };
        if let Some(c) = true_one(DOMAIN_REFUSED)
            && let Some(reason) = Refusal::parse(&c.reason)
        {
            return SpecNote::Refused {
                reason,
                message: c.message.clone(),
            };
        }
        match true_one(RESTART_REQUIRED) {
            Some(c) => SpecNote::RestartRequired(c.message.clone()),
            None => SpecNote::None,
        }
    }

    /// Writes the note into `conditions`: its condition set, the other one and
    /// `ShuttingDown` (the guest is not being shut down when this is written) removed.
    pub fn apply(&self, conditions: &mut Vec<Condition>, generation: Option<i64>, now: Time) {
        let keep = match self {
            SpecNote::None => None,
            SpecNote::RestartRequired(_) => Some(RESTART_REQUIRED),
            SpecNote::Refused { .. } => Some(DOMAIN_REFUSED),
        };
        conditions.retain(|c| {
            c.type_ != SHUTTING_DOWN
                && ((c.type_ != RESTART_REQUIRED && c.type_ != DOMAIN_REFUSED)
                    || Some(c.type_.as_str()) == keep)
        });
        match self {
            SpecNote::None => {}
            SpecNote::RestartRequired(message) => set_condition(
                conditions,
                RESTART_REQUIRED,
                true,
                "DomainChanged",
                message,
                generation,
                now,
            ),
            SpecNote::Refused { reason, message } => set_condition(
                conditions,
                DOMAIN_REFUSED,
                true,
                reason.as_str(),
                message,
                generation,
                now,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    const XML: &str = "<domain type='qemu'><name>demo</name>\
        <uuid>6f1c0b8e-5a52-4d3e-9a43-0d6f2a7c1b10</uuid><memory unit='MiB'>64</memory>\
        <vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>\
        <features><acpi/></features><cpu mode='maximum'/><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='raw'/>\
        <source file='/d/demo.img'/><target dev='vda' bus='virtio'/></disk>\
        <serial type='file'><target port='0'/></serial></devices></domain>";

    fn parse(xml: &str) -> Result<Domain, DomainError> {
        Domain::parse(xml)
    }

    #[test]
    fn a_spec_is_checked_against_the_running_definition() {
        let running = parse(XML).unwrap();
        // No guest runs: a valid spec is simply the next start's.
        assert_eq!(check(None, parse(XML).as_ref()), SpecCheck::Current);
        assert_eq!(
            check(Some(&running), parse(XML).as_ref()),
            SpecCheck::Current
        );
        // The copy in the state dir (written back by the supervisor) is the same.
        let stored = parse(&running.to_xml()).unwrap();
        assert_eq!(
            check(Some(&stored), parse(XML).as_ref()),
            SpecCheck::Current
        );
        // The same definition written differently is the same.
        let quoted = XML.replace("<domain type='qemu'>", "<domain type=\"qemu\">\n  ");
        assert_eq!(
            check(Some(&running), parse(&quoted).as_ref()),
            SpecCheck::Current
        );
        let bigger = XML.replace("'MiB'>64", "'MiB'>96");
        assert_eq!(
            check(Some(&running), parse(&bigger).as_ref()),
            SpecCheck::Changed(vec!["memory '65536 KiB' → '98304 KiB'".into()])
        );
        let renamed = XML.replace("<name>demo", "<name>demo2");
        assert_eq!(
            check(Some(&running), parse(&renamed).as_ref()),
            SpecCheck::IdentityChanged(vec!["name 'demo' → 'demo2'".into()])
        );
        let other = XML.replace("6f1c0b8e", "00000000");
        assert!(matches!(
            check(Some(&running), parse(&other).as_ref()),
            SpecCheck::IdentityChanged(c) if c[0].starts_with("uuid '6f1c0b8e")
        ));
        let unsupported = XML.replace("<vcpu>", "<hugepages/><vcpu>");
        match check(Some(&running), parse(&unsupported).as_ref()) {
            SpecCheck::Invalid(why) => assert!(why.contains("<hugepages>"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn notes_round_trip_through_the_conditions() {
        let now = Time(Timestamp::from_second(1_800_000_000).unwrap());
        let running = parse(XML).unwrap();
        let bigger = parse(&XML.replace("'MiB'>64", "'MiB'>96")).unwrap();
        let changed = SpecNote::for_running(&check(Some(&running), Ok(&bigger)));
        assert!(
            matches!(&changed, SpecNote::RestartRequired(m) if m.contains("memory '65536 KiB' → '98304 KiB'")),
            "{changed:?}"
        );
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            "Ready",
            true,
            "Running",
            "up",
            Some(1),
            now.clone(),
        );
        set_condition(
            &mut conditions,
            SHUTTING_DOWN,
            true,
            "Stopping",
            "",
            Some(1),
            now.clone(),
        );
        changed.apply(&mut conditions, Some(2), now.clone());
        assert_eq!(SpecNote::of(&conditions), changed);
        let types: Vec<&str> = conditions.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(types, vec!["Ready", RESTART_REQUIRED]);
        let refused = SpecNote::for_running(&SpecCheck::Invalid("bad".into()));
        refused.apply(&mut conditions, Some(3), now.clone());
        assert_eq!(SpecNote::of(&conditions), refused);
        let c = conditions
            .iter()
            .find(|c| c.type_ == DOMAIN_REFUSED)
            .unwrap();
        assert_eq!(c.reason, "InvalidDomain");
        assert!(!conditions.iter().any(|c| c.type_ == RESTART_REQUIRED));
        SpecNote::None.apply(&mut conditions, Some(4), now);
        assert_eq!(SpecNote::of(&conditions), SpecNote::None);
        assert_eq!(conditions.len(), 1);
    }
}
