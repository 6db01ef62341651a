//! An interest list (`B SUBS`, `B CELL`): never a panic; one that decodes is written back
//! byte for byte by the encoder.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use thynapse_protocol::wire::{decode_interest, encode_interest};

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = decode_interest(Bytes::copy_from_slice(data)) else {
        return;
    };
    let again = encode_interest(entries.iter().map(|(op, kind, name)| (*op, *kind, &name[..])));
    assert_eq!(&again[..], data);
});
