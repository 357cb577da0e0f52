//! The frame walker on any bytes, cut at any points, under any rules: it never
//! panics, never holds more than a control frame, and its verdicts are final.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::frame::{MAX_HELD, Rules, Walk, Walker};

fuzz_target!(|input: &[u8]| {
    let Some((&flags, rest)) = input.split_first() else {
        return;
    };
    let Some((&cut, stream)) = rest.split_first() else {
        return;
    };
    let rules = Rules {
        strict: flags & 1 != 0,
        from_client: flags & 2 != 0,
        extensions: flags & 4 != 0,
    };
    let max = [0u64, 125, 1 << 16, u64::MAX][usize::from(flags >> 6)];
    let mut walker = Walker::with_rules(max, rules);
    let step = usize::from(cut).max(1);
    let mut carry: Vec<u8> = Vec::new();
    for piece in stream.chunks(step) {
        let mut data = std::mem::take(&mut carry);
        data.extend_from_slice(piece);
        match walker.walk(&data) {
            Walk::Forward { held } => {
                assert!(held <= MAX_HELD && held <= data.len());
                carry = data[data.len() - held..].to_vec();
            }
            Walk::TooBig { at } | Walk::Broken { at, .. } => {
                assert!(at < data.len());
                return;
            }
        }
    }
});
