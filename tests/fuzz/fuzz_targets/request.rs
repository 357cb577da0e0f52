//! Request validation on any request head: parsed as hyper would (httparse),
//! then normalised, validated and turned into the backend's request. Nothing
//! panics, and a request that passes validation yields a backend request whose
//! path is normal and whose WebSocket headers survived.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::clients::Peer;
use wsgate::handshake;

fuzz_target!(|input: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(input) else {
        return;
    };
    let mut request = http::Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"));
    for h in parsed.headers.iter() {
        request = request.header(h.name, h.value);
    }
    let Ok(mut request) = request.body(()) else {
        return;
    };
    handshake::normalize_path(&mut request);
    let path = request.uri().path().to_string();
    assert!(!path.contains("//") && !path.contains("/../") && !path.ends_with("/.."));
    if handshake::validate(&request).is_err() {
        return;
    }
    let peer = Peer {
        client: "127.0.0.1:1".parse().expect("addr"),
        trusted: false,
    };
    let out = handshake::backend_request(&mut request, &peer, "http", None);
    assert_eq!(out.uri().path(), path);
    assert!(out.headers().contains_key(http::header::SEC_WEBSOCKET_KEY));
    assert_eq!(out.headers()["x-forwarded-for"], "127.0.0.1");
});
