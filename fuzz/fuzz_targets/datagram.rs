//! A discovery datagram (announce, query, locate and the answers): never a panic; one
//! that parses reads back the same after it is written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thynapse_protocol::discovery::Datagram;

fuzz_target!(|data: &[u8]| {
    let Ok(datagram) = Datagram::parse(data) else {
        return;
    };
    let written = datagram.to_bytes();
    let again = Datagram::parse(&written).expect("a written datagram parses");
    assert_eq!(again.to_bytes(), written);
});
