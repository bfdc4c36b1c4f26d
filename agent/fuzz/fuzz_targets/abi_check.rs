//! A migration's target XML (spec.targetDomainXML, the user's): parsed, then checked for
//! ABI stability against a running guest's definition. Never a panic; a definition is
//! always ABI-compatible with itself.
#![no_main]

use ferry_agent::abi;
use ferry_agent::domain::Domain;
use libfuzzer_sys::fuzz_target;

const SOURCE: &str = include_str!("../seeds/abi_check/sample.xml");

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    let source = Domain::parse(SOURCE).expect("the sample parses");
    if let Ok(target) = Domain::parse(xml) {
        let _ = abi::check(&source, &target);
        let _ = abi::check(&target, &source);
        assert!(
            abi::check(&target, &target).is_ok(),
            "a definition is ABI-stable with itself"
        );
    }
});
