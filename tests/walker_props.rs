//! Property tests: the frame walker, fed any byte stream split at any points the way
//! the relay feeds it, agrees with a straightforward whole-buffer parser written
//! here from RFC 6455, and never panics.

use proptest::prelude::*;
use wsgate::frame::{MAX_HELD, Rules, Walk, Walker, encode};

/// What the reference parser makes of a whole stream.
#[derive(Debug, Default, PartialEq, Eq)]
struct Verdict {
    /// Offsets where a frame starts (and the end, when a frame ends there).
    boundaries: Vec<usize>,
    messages: u64,
    close: Option<u16>,
    /// Where forwarding stops for good, with the close code (1009 for too big).
    stop: Option<(usize, u16)>,
    /// The incomplete tail held back (a header, or a close frame) when no stop.
    held: usize,
}

/// The whole stream at once, frame by frame, the rules in the order RFC 6455
/// states them.
fn reference(stream: &[u8], max: u64, rules: Rules) -> Verdict {
    let mut v = Verdict::default();
    let mut pos = 0usize;
    let mut message: Option<u64> = None;
    while pos < stream.len() {
        v.boundaries.push(pos);
        let rest = &stream[pos..];
        // The header: 2 bytes, extended length, mask key.
        if rest.len() < 2 {
            v.held = rest.len();
            return v;
        }
        let (fin, rsv, opcode) = (rest[0] >> 7 == 1, (rest[0] >> 4) & 7, rest[0] & 15);
        let masked = rest[1] >> 7 == 1;
        let (len, mut header) = match rest[1] & 127 {
            126 if rest.len() >= 4 => (u64::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 if rest.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&rest[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            126 | 127 => {
                v.held = rest.len();
                return v;
            }
            n => (u64::from(n), 2),
        };
        let key = if masked {
            if rest.len() < header + 4 {
                v.held = rest.len();
                return v;
            }
            let k = [
                rest[header],
                rest[header + 1],
                rest[header + 2],
                rest[header + 3],
            ];
            header += 4;
            k
        } else {
            [0; 4]
        };
        let stop = |code| Some((pos, code));
        let control = opcode >= 8;
        let reserved = matches!(opcode, 3..=7 | 11..=15);
        if rules.strict {
            if masked != rules.from_client || (rsv != 0 && !rules.extensions) || reserved {
                v.stop = stop(1002);
                return v;
            }
            if (opcode == 0 && message.is_none()) || (matches!(opcode, 1 | 2) && message.is_some())
            {
                v.stop = stop(1002);
                return v;
            }
        }
        if control && (len > 125 || !fin) {
            v.stop = stop(1002);
            return v;
        }
        let total = if opcode == 0 {
            message.unwrap_or(0).saturating_add(len)
        } else {
            len
        };
        if total > max {
            v.stop = stop(1009);
            return v;
        }
        if opcode <= 2 {
            message = if fin { None } else { Some(total) };
            if fin {
                v.messages += 1;
            }
        }
        let end = header as u64 + len;
        if opcode == 8 {
            // Close frames are judged whole.
            if (rest.len() as u64) < end {
                v.held = rest.len();
                return v;
            }
            let body: Vec<u8> = rest[header..end as usize]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i % 4])
                .collect();
            let code = match body.len() {
                // No status code: nothing to check.
                0 => {
                    v.close.get_or_insert(1005);
                    pos += end as usize;
                    continue;
                }
                1 if rules.strict => {
                    v.stop = stop(1002);
                    return v;
                }
                1 => 1005,
                _ => u16::from_be_bytes([body[0], body[1]]),
            };
            if rules.strict {
                let sendable = (1000..=1003).contains(&code)
                    || (1007..=1014).contains(&code)
                    || (3000..=4999).contains(&code);
                if !sendable {
                    v.stop = stop(1002);
                    return v;
                }
                if std::str::from_utf8(&body[2..]).is_err() {
                    v.stop = stop(1007);
                    return v;
                }
            }
            v.close.get_or_insert(code);
        }
        if (rest.len() as u64) < end {
            // The stream ends inside this frame's payload.
            return v;
        }
        pos += end as usize;
    }
    v.boundaries.push(pos);
    v
}

/// What the walker makes of the same stream cut at `cuts`, carrying held bytes
/// into the next piece as the relay does.
fn walked(stream: &[u8], cuts: &[usize], max: u64, rules: Rules) -> Verdict {
    let mut walker = Walker::with_rules(max, rules);
    let mut v = Verdict::default();
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.push(stream.len());
    points.sort_unstable();
    let (mut start, mut carry) = (0usize, Vec::new());
    for end in points {
        let mut data = std::mem::take(&mut carry);
        let base = start - data.len();
        data.extend_from_slice(&stream[start..end]);
        start = end;
        let forwarded = match walker.walk(&data) {
            Walk::Forward { held } => {
                assert!(held <= MAX_HELD, "held {held} bytes");
                carry = data[data.len() - held..].to_vec();
                base + data.len() - held
            }
            Walk::TooBig { at } => {
                v.stop = Some((base + at, 1009));
                break;
            }
            Walk::Broken { at, code } => {
                v.stop = Some((base + at, code));
                break;
            }
        };
        if walker.at_boundary() {
            v.boundaries.push(forwarded);
        }
        v.held = carry.len();
    }
    v.messages = walker.messages();
    v.close = walker.close_code();
    if v.stop.is_some() {
        v.held = 0;
    }
    v
}

#[derive(Debug, Clone)]
struct Spec {
    first: u8,
    masked: bool,
    len: usize,
    close_body: Option<Vec<u8>>,
}

fn spec() -> impl Strategy<Value = Spec> {
    let len = prop_oneof![8 => 0usize..130, 1 => 126usize..300, 1 => 65_530usize..65_600];
    let close_body = prop_oneof![
        Just(None),
        (
            prop_oneof![
                (990u16..1020),
                (2990u16..3010),
                (4990u16..5010),
                any::<u16>()
            ],
            prop_oneof![
                Just(b"bye".to_vec()),
                Just(vec![0xff, 0xfe]),
                Just(Vec::new())
            ],
        )
            .prop_map(|(code, reason)| {
                let mut b = code.to_be_bytes().to_vec();
                b.extend(reason);
                Some(b)
            }),
        Just(Some(vec![3])),
    ];
    let opcode = prop_oneof![6 => prop_oneof![Just(0u8), Just(1), Just(2), Just(8), Just(9), Just(10)], 1 => 0u8..16];
    let rsv = prop_oneof![9 => Just(0u8), 1 => 0u8..8];
    (
        any::<bool>(),
        rsv,
        opcode,
        prop_oneof![9 => Just(true), 1 => Just(false)],
        len,
        close_body,
    )
        .prop_map(|(fin, rsv, opcode, masked, len, close_body)| Spec {
            first: (u8::from(fin || opcode >= 8) << 7) | (rsv << 4) | opcode,
            masked,
            len,
            close_body: if opcode == 8 { close_body } else { None },
        })
}

fn build(specs: &[Spec], flip_mask: bool, tail: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for s in specs {
        let payload = s.close_body.clone().unwrap_or_else(|| vec![0x5a; s.len]);
        let mask = (s.masked != flip_mask).then_some([0x37, 0xfa, 0x21, 0x3d]);
        out.extend(encode(s.first, &payload, mask));
    }
    out.extend_from_slice(tail);
    out
}

fn rules() -> impl Strategy<Value = Rules> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(strict, from_client, extensions)| {
        Rules {
            strict,
            from_client,
            extensions,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn the_walker_agrees_with_the_reference_however_the_stream_is_split(
        specs in proptest::collection::vec(spec(), 0..10),
        tail in proptest::collection::vec(any::<u8>(), 0..20),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        rules in rules(),
        max in prop_oneof![Just(0u64), Just(100), Just(125), Just(1000), Just(70_000), Just(u64::MAX)],
    ) {
        let stream = build(&specs, !rules.from_client, &tail);
        let want = reference(&stream, max, rules);
        let got = walked(&stream, &cuts, max, rules);
        prop_assert_eq!(got.stop, want.stop);
        prop_assert_eq!(got.messages, want.messages);
        prop_assert_eq!(got.close, want.close);
        if want.stop.is_none() {
            prop_assert_eq!(got.held, want.held);
        }
        // Every place the walker said "at a boundary" is a frame start (or the end
        // of a complete frame) in the reference.
        for b in &got.boundaries {
            prop_assert!(want.boundaries.contains(b), "walker boundary {} not in {:?}", b, want.boundaries);
        }
    }

    #[test]
    fn any_bytes_any_split_never_panic(
        stream in proptest::collection::vec(any::<u8>(), 0..400),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        rules in rules(),
        max in prop_oneof![Just(0u64), Just(125), Just(u64::MAX)],
    ) {
        let want = reference(&stream, max, rules);
        let got = walked(&stream, &cuts, max, rules);
        prop_assert_eq!(got.stop, want.stop);
        prop_assert_eq!(got.messages, want.messages);
    }
}
