//! A `DLVR` or `FWRD` batch: never a panic; one that decodes is written back byte for
//! byte by the encoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thynapse_protocol::batch::{decode_envelopes, EnvelopeBatchWriter};

fuzz_target!(|data: &[u8]| {
    let Ok((batch, envelopes)) = decode_envelopes(data) else {
        return;
    };
    let mut w = EnvelopeBatchWriter::default();
    for e in envelopes {
        let targets: Vec<_> = e.targets().collect();
        w.push(e.kind, &e.origin, e.seq, e.ts, e.channel, e.payload, &targets);
    }
    assert_eq!(&w.finish(batch)[..], data);
});
