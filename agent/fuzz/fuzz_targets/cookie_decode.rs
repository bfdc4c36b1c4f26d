//! A migration cookie read from the status (written by the other agent, or forged): any
//! input is decoded or refused, never a panic; what decodes encodes and decodes again.
#![no_main]

use ferry_agent::cookie::{Cookie, Expect};
use ferry_agent::phases::Phase;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

const PHASES: [Phase; 4] = [Phase::Begin, Phase::Prepare, Phase::Perform, Phase::Finish];

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let Ok(xml) = std::str::from_utf8(rest) else {
        return;
    };
    let writer = PHASES[which as usize % PHASES.len()];
    let expect = Expect {
        vm_name: "guest-1",
        vm_uuid: Uuid::from_u128(0x7c5f6d2a_3a8e_4a57_9b0e_1d2c3b4a5f60),
        writer,
        own_host_uuid: Uuid::from_u128(2),
    };
    if let Ok(cookie) = Cookie::decode(xml, &expect) {
        let encoded = cookie.encode(writer).expect("a decoded cookie encodes");
        let again = Cookie::decode(&encoded, &expect).expect("an encoded cookie decodes");
        assert_eq!(cookie, again, "a cookie round-trips");
    }
});
