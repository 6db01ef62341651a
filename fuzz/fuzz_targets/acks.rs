//! A `B ACKS` body: never a panic; one that decodes is written back byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thynapse_protocol::batch::{decode_acks, encode_acks};

fuzz_target!(|data: &[u8]| {
    if let Ok((first, counts)) = decode_acks(data) {
        assert_eq!(&encode_acks(first, &counts)[..], data);
    }
});
