//! A discovery datagram (announce, query, locate and the answers), sealed or not: never a
//! panic; one that parses reads back the same after it is written; a seal that opens is
//! one this process made (the fuzzer cannot forge an HMAC), and taken once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thynapse_protocol::discovery::Datagram;
use thynapse_protocol::seal::{self, Opener, Sealer};

const NOW: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let (body, _) = seal::open(data);
    // What the rendezvous does with it: a datagram from the fuzzer never opens.
    let mut opener = Opener::new("fuzz", vec![b"token".to_vec()], 0);
    assert!(opener.take(data, NOW).is_err());
    // Sealed for real, the same body is taken once.
    let sealer = Sealer::peer(&[b"token".to_vec()], "fuzz").expect("a token");
    let (sealed, _) = sealer.request(body, NOW);
    if !body.contains(&b'\n') {
        assert_eq!(opener.take(&sealed, NOW).expect("a real seal opens").body, body);
        assert!(opener.take(&sealed, NOW).is_err(), "taken once");
    }
    let Ok(datagram) = Datagram::parse(body) else {
        return;
    };
    let written = datagram.to_bytes();
    let again = Datagram::parse(&written).expect("a written datagram parses");
    assert_eq!(again.to_bytes(), written);
});
