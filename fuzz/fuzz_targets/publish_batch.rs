//! A `PUBS` batch (and its further frames of records): never a panic; a batch that
//! decodes is written back byte for byte by the encoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thynapse_protocol::batch::{decode_publish_records, decode_publishes, PublishBatchWriter};

fuzz_target!(|data: &[u8]| {
    if let Ok((first, records)) = decode_publishes(data) {
        let mut w = PublishBatchWriter::new(first);
        for r in records {
            w.push(r.kind, r.ts, r.channel, r.payload);
        }
        assert_eq!(&w.finish()[..], data);
    }
    if let Ok(records) = decode_publish_records(data) {
        records.for_each(drop);
    }
});
