//! RESP requests as a sidecar reads them from its clients (multibulk and inline), one
//! after another from a buffer: never a panic, every argument within the buffer, and
//! always progress.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thynapse_sidecar::resp::parse_request;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while let Ok(Some((request, next))) = parse_request(data, at) {
        assert!(next > at && next <= data.len(), "no progress or past the end");
        for arg in &request {
            assert!(arg.start <= arg.end && arg.end <= next);
        }
        at = next;
    }
});
