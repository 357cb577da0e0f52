//! The frame walker: follows WebSocket frame headers (RFC 6455 §5.2) through a byte
//! stream as it is relayed, without unmasking payloads or allocating.
//!
//! It knows where each frame starts, so the relay can count messages, stop a message
//! that grows past the pool's limit before its first byte is forwarded, and write a
//! close frame of its own only where the receiver expects a frame header.

/// The longest frame header: 2 bytes, 8 bytes of extended length, 4 of mask key.
pub const MAX_HEADER: usize = 14;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;

/// Close codes wsgate sends itself (RFC 6455 §7.4.1).
pub mod close_code {
    /// Idle timeout, shutdown or drain; also sent to a backend whose client vanished.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame that breaks RFC 6455: a control frame over 125 bytes or fragmented;
    /// with strict frames also a wrong mask bit, a reserved opcode, RSV bits without
    /// an extension, an orphan continuation and a bad close frame.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A close frame whose reason is not UTF-8 (strict frames).
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message larger than the pool's `max_message_size`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The backend connection ended without a close frame (reset, crash, EOF).
    pub const BACKEND_GONE: u16 = 1011;
    /// Service Restart: "reconnect, you will land elsewhere" (drain, rebalance).
    pub const SERVICE_RESTART: u16 = 1012;
    /// A close frame with no status code in it.
    pub const NO_STATUS: u16 = 1005;

    /// Whether an endpoint may put `code` in a close frame (RFC 6455 §7.4, and the
    /// IANA registry's 1012–1014); 1005, 1006 and 1015 are for reporting only.
    pub fn may_be_sent(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// What the relay may do with the bytes it just walked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// Forward everything but the last `held` bytes: the start of a frame header,
    /// or of a close frame, that the next read completes (at most [`MAX_HELD`]).
    Forward { held: usize },
    /// The frame starting at byte `at` would make its message (or itself, for a
    /// control frame) longer than the limit; bytes before it may be forwarded,
    /// nothing from it on.
    TooBig { at: usize },
    /// The frame starting at byte `at` breaks the protocol: both ends are to be
    /// closed with `code` (1002, or 1007 for a close reason that is not UTF-8);
    /// nothing from it on.
    Broken { at: usize, code: u16 },
}

/// What a walker checks, beyond frame lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Check every frame against RFC 6455 (`[server] strict_frames`). Without it
    /// only control frames over 125 bytes or fragmented are refused.
    pub strict: bool,
    /// The sender is a client, whose frames must be masked; a server's must not be.
    pub from_client: bool,
    /// An extension was negotiated, so RSV bits are its business.
    pub extensions: bool,
}

impl Rules {
    /// Control-frame lengths only, as without `strict_frames`.
    pub const LENIENT: Rules = Rules {
        strict: false,
        from_client: true,
        extensions: true,
    };
}

/// Walks one direction of one connection.
#[derive(Debug, Clone)]
pub struct Walker {
    max_message: u64,
    /// Payload bytes of the current frame not yet seen; 0 at a frame boundary.
    remaining: u64,
    /// Length so far of the data message being received (all its fragments).
    message_len: u64,
    /// Complete data messages seen.
    messages: u64,
    rules: Rules,
    /// A data message has begun and its last fragment has not come.
    in_message: bool,
    /// The status code of the first close frame (1005 when it had none).
    close: Option<u16>,
}

struct Header {
    len: usize,
    fin: bool,
    rsv: u8,
    opcode: u8,
    masked: bool,
    payload: u64,
    mask: [u8; 4],
}

fn parse_header(data: &[u8]) -> Option<Header> {
    let b0 = *data.first()?;
    let b1 = *data.get(1)?;
    let masked = b1 & 0x80 != 0;
    let (payload, mut len) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes([*data.get(2)?, *data.get(3)?])),
            4,
        ),
        127 => {
            let bytes: [u8; 8] = data.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(bytes), 10)
        }
        n => (u64::from(n), 2),
    };
    let mut mask = [0u8; 4];
    if masked {
        mask.copy_from_slice(data.get(len..len + 4)?);
        len += 4;
    }
    Some(Header {
        len,
        fin: b0 & 0x80 != 0,
        rsv: b0 & 0x70,
        opcode: b0 & 0x0f,
        masked,
        payload,
        mask,
    })
}

/// The longest control frame: a 2-byte header, a mask key and 125 bytes.
const MAX_CONTROL: usize = 2 + 4 + 125;

/// The most a walk holds back: a whole control frame (close frames are checked
/// whole before a byte of them goes on).
pub const MAX_HELD: usize = MAX_CONTROL;

impl Walker {
    /// A walker that refuses only what no configuration allows (see [`Rules::LENIENT`]).
    pub fn new(max_message: u64) -> Walker {
        Walker::with_rules(max_message, Rules::LENIENT)
    }

    pub fn with_rules(max_message: u64, rules: Rules) -> Walker {
        Walker {
            max_message,
            remaining: 0,
            message_len: 0,
            messages: 0,
            rules,
            in_message: false,
            close: None,
        }
    }

    /// True where a new frame may be written: no frame is half forwarded.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Complete data messages (text or binary, however fragmented) walked so far.
    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// The status code of the close frame walked, if one was (1005 when it had none).
    pub fn close_code(&self) -> Option<u16> {
        self.close
    }

    /// Walks `data`, which continues exactly where the last call's forwarded bytes
    /// ended (held bytes are passed again at the front).
    pub fn walk(&mut self, data: &[u8]) -> Walk {
        let mut pos = 0usize;
        while pos < data.len() {
            if self.remaining > 0 {
                let available = (data.len() - pos) as u64;
                let take = self.remaining.min(available) as usize;
                pos += take;
                self.remaining -= take as u64;
                continue;
            }
            let Some(header) = parse_header(&data[pos..]) else {
                return Walk::Forward {
                    held: data.len() - pos,
                };
            };
            let broken = |code| Walk::Broken { at: pos, code };
            let strict = self.rules.strict;
            if strict
                && (header.masked != self.rules.from_client
                    || (header.rsv != 0 && !self.rules.extensions))
            {
                return broken(close_code::PROTOCOL_ERROR);
            }
            match header.opcode {
                OP_TEXT | OP_BINARY | OP_CONTINUATION => {
                    let continues = header.opcode == OP_CONTINUATION;
                    if strict && continues != self.in_message {
                        return broken(close_code::PROTOCOL_ERROR);
                    }
                    let len = if continues {
                        self.message_len.saturating_add(header.payload)
                    } else {
                        header.payload
                    };
                    if len > self.max_message {
                        return Walk::TooBig { at: pos };
                    }
                    self.message_len = len;
                    self.in_message = !header.fin;
                    if header.fin {
                        self.messages += 1;
                        self.message_len = 0;
                    }
                }
                0x3..=0x7 | 0xb..=0xf if strict => return broken(close_code::PROTOCOL_ERROR),
                0x8..=0xf if header.payload > 125 || !header.fin => {
                    return broken(close_code::PROTOCOL_ERROR);
                }
                _ if header.payload > self.max_message => return Walk::TooBig { at: pos },
                OP_CLOSE => {
                    let end = header.len + header.payload as usize;
                    let Some(frame) = data.get(pos..pos + end) else {
                        return Walk::Forward {
                            held: data.len() - pos,
                        };
                    };
                    let code = match self.read_close(&header, &frame[header.len..]) {
                        Ok(code) => code,
                        Err(code) => return broken(code),
                    };
                    self.close.get_or_insert(code);
                    pos += end;
                    continue;
                }
                _ => {}
            }
            pos += header.len;
            self.remaining = header.payload;
        }
        Walk::Forward { held: 0 }
    }

    /// The status code of a whole close frame's `payload` (still masked), checked
    /// when strict: `Err` carries the code to close with.
    fn read_close(&self, header: &Header, payload: &[u8]) -> Result<u16, u16> {
        let mut body = [0u8; 125];
        let body = &mut body[..payload.len()];
        for (i, (out, byte)) in body.iter_mut().zip(payload).enumerate() {
            *out = byte ^ header.mask[i % 4];
        }
        let code = match body {
            [] => return Ok(close_code::NO_STATUS),
            [_] if self.rules.strict => return Err(close_code::PROTOCOL_ERROR),
            [_] => return Ok(close_code::NO_STATUS),
            [a, b, ..] => u16::from_be_bytes([*a, *b]),
        };
        if self.rules.strict {
            if !close_code::may_be_sent(code) {
                return Err(close_code::PROTOCOL_ERROR);
            }
            if std::str::from_utf8(&body[2..]).is_err() {
                return Err(close_code::INVALID_PAYLOAD);
            }
        }
        Ok(code)
    }
}

/// A close frame with `code` and no reason; masked (as a client must) when `mask`
/// is given. Returns the buffer and how much of it is the frame.
pub fn close_frame(code: u16, mask: Option<[u8; 4]>) -> ([u8; 8], usize) {
    let mut out = [0u8; 8];
    out[0] = 0x80 | OP_CLOSE;
    let code = code.to_be_bytes();
    match mask {
        None => {
            out[1] = 2;
            out[2..4].copy_from_slice(&code);
            (out, 4)
        }
        Some(key) => {
            out[1] = 0x80 | 2;
            out[2..6].copy_from_slice(&key);
            out[6] = code[0] ^ key[0];
            out[7] = code[1] ^ key[1];
            (out, 8)
        }
    }
}

/// Encodes one whole frame: `first_byte` is FIN, RSV and opcode; the payload is
/// masked with `mask` when given (client to server). For tests and tools: the relay
/// itself never builds frames but its own close frames.
pub fn encode(first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + MAX_HEADER);
    out.push(first_byte);
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n <= 0xffff => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        encode((u8::from(fin) << 7) | opcode, payload, mask)
    }

    /// Feeds `stream` in chunks of `chunk` bytes the way the relay does, carrying
    /// held bytes over; returns the bytes it would forward.
    fn relay(walker: &mut Walker, stream: &[u8], chunk: usize) -> (Vec<u8>, Option<usize>) {
        let mut out = Vec::new();
        let mut carry: Vec<u8> = Vec::new();
        for piece in stream.chunks(chunk) {
            let mut data = std::mem::take(&mut carry);
            data.extend_from_slice(piece);
            match walker.walk(&data) {
                Walk::Forward { held } => {
                    out.extend_from_slice(&data[..data.len() - held]);
                    carry = data[data.len() - held..].to_vec();
                }
                Walk::TooBig { at } => {
                    out.extend_from_slice(&data[..at]);
                    return (out, Some(at));
                }
                Walk::Broken { .. } => panic!("a well-formed stream"),
            }
        }
        (out, None)
    }

    fn mixed_stream() -> Vec<u8> {
        let key = Some([1, 2, 3, 4]);
        let mut s = Vec::new();
        s.extend(frame(true, OP_TEXT, b"hello", key));
        s.extend(frame(false, OP_BINARY, &[7; 300], key));
        s.extend(frame(true, 0x9, b"ping", key));
        s.extend(frame(true, OP_CONTINUATION, &[8; 70_000], key));
        s.extend(frame(true, OP_TEXT, b"", key));
        s.extend(frame(true, OP_CLOSE, &[0x03, 0xe8, b'b', b'y', b'e'], key));
        s
    }

    #[test]
    fn counts_messages_and_reads_the_close_code_in_any_chunking() {
        let stream = mixed_stream();
        for chunk in [1, 2, 3, 7, 13, 14, 100, 4096, 1 << 20] {
            let mut w = Walker::new(1 << 20);
            let (out, too_big) = relay(&mut w, &stream, chunk);
            assert_eq!(too_big, None);
            assert_eq!(out, stream, "chunk {chunk}");
            assert_eq!(w.messages(), 3, "chunk {chunk}");
            assert_eq!(w.close_code(), Some(1000), "chunk {chunk}");
            assert!(w.at_boundary());
        }
    }

    #[test]
    fn stops_before_the_frame_that_overflows_the_message() {
        let stream = mixed_stream();
        let mut w = Walker::new(60_000);
        let (out, too_big) = relay(&mut w, &stream, 999);
        let second_continuation = frame(true, OP_TEXT, b"hello", Some([1, 2, 3, 4])).len()
            + frame(false, OP_BINARY, &[7; 300], Some([1, 2, 3, 4])).len()
            + frame(true, 0x9, b"ping", Some([1, 2, 3, 4])).len();
        assert_eq!(out.len(), second_continuation);
        assert!(too_big.is_some());
        assert!(w.at_boundary());
    }

    #[test]
    fn stops_at_a_control_frame_no_endpoint_may_send() {
        for (fin, len) in [(true, 126usize), (true, 20 << 20), (false, 4)] {
            let mut stream = frame(true, OP_TEXT, b"ok", Some([1, 2, 3, 4]));
            let at = stream.len();
            stream.extend(frame(fin, 0x9, &vec![0u8; len], Some([1, 2, 3, 4])));
            for chunk in [1, 7, 4096] {
                let mut walker = Walker::new(1 << 30);
                let mut verdict = None;
                let mut base = 0;
                let mut carry: Vec<u8> = Vec::new();
                for piece in stream.chunks(chunk) {
                    let mut data = std::mem::take(&mut carry);
                    let start = base - data.len();
                    data.extend_from_slice(piece);
                    base += piece.len();
                    match walker.walk(&data) {
                        Walk::Forward { held } => carry = data[data.len() - held..].to_vec(),
                        Walk::Broken { at, code } => {
                            assert_eq!(code, close_code::PROTOCOL_ERROR);
                            verdict = Some(start + at);
                            break;
                        }
                        Walk::TooBig { .. } => panic!("not a size verdict"),
                    }
                }
                assert_eq!(
                    verdict,
                    Some(at),
                    "fin {fin}, {len} bytes, chunks of {chunk}"
                );
            }
        }
        // A 125-byte ping passes.
        let mut walker = Walker::new(1 << 30);
        let ping = frame(true, 0x9, &[0u8; 125], None);
        assert_eq!(walker.walk(&ping), Walk::Forward { held: 0 });
    }

    #[test]
    fn server_frames_and_empty_close() {
        let mut s = frame(true, OP_TEXT, b"x", None);
        s.extend(frame(true, OP_CLOSE, b"", None));
        let mut w = Walker::new(10);
        assert_eq!(w.walk(&s), Walk::Forward { held: 0 });
        assert_eq!(w.messages(), 1);
        assert_eq!(w.close_code(), Some(close_code::NO_STATUS));
    }

    #[test]
    fn close_frames_it_writes_are_walkable() {
        for mask in [None, Some([9, 8, 7, 6])] {
            let (buf, len) = close_frame(1011, mask);
            let mut w = Walker::new(10);
            assert_eq!(w.walk(&buf[..len]), Walk::Forward { held: 0 });
            assert_eq!(w.close_code(), Some(1011));
        }
    }
}
