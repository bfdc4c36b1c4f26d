//! Domain XML from a user's VirtualMachine spec: any input is parsed or refused, never a
//! panic; what parses is written back and parses again to the same definition.
#![no_main]

use ferry_agent::domain::Domain;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(domain) = Domain::parse(xml) {
        let again = Domain::parse(&domain.to_xml()).expect("a parsed domain's XML parses again");
        assert_eq!(domain, again, "a parsed domain round-trips");
    }
});
