//! The RESP request parser on arbitrary bytes: it never panics, never reads past the
//! buffer, and reads back every request a client would write (proptest).

use proptest::prelude::*;
use thynapse_sidecar::resp::parse_request;

/// A request as clients write it: `*N` then N `$len` bulk strings.
fn encode(args: &[Vec<u8>]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut at = 0;
        // Parse request after request, as a connection does, until more bytes are needed.
        while let Ok(Some((args, next))) = parse_request(&input, at) {
            for r in &args {
                prop_assert!(r.end <= input.len() && r.start <= r.end);
            }
            prop_assert!(next > at && next <= input.len());
            at = next;
        }
    }

    #[test]
    fn requests_read_back_as_written(
        requests in prop::collection::vec(
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..5),
            1..6,
        ),
    ) {
        let mut buf = Vec::new();
        for r in &requests {
            buf.extend(encode(r));
        }
        let mut at = 0;
        for r in &requests {
            let (args, next) = parse_request(&buf, at).unwrap().expect("a whole request");
            let got: Vec<Vec<u8>> = args.iter().map(|a| buf[a.clone()].to_vec()).collect();
            prop_assert_eq!(&got, r);
            at = next;
        }
        prop_assert_eq!(at, buf.len());
        // Any strict prefix of a request asks for more bytes, never errs.
        let first = encode(&requests[0]);
        for cut in 0..first.len() {
            prop_assert_eq!(parse_request(&first[..cut], 0), Ok(None));
        }
    }
}
