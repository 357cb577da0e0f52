//! The least-connections pick over pools of 3, 30 and 300 backends (the upgrade
//! path's balancing cost), and the frame walker over a mixed stream (the per-byte
//! cost of understanding WebSocket frames).

use std::hint::black_box;
use std::num::NonZeroU32;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsgate::balancer::Pool;
use wsgate::config::{BackendAddr, BackendConfig, PoolConfig};
use wsgate::frame::{Walk, Walker, encode};

fn pool(n: usize) -> Pool {
    let backends = (0..n)
        .map(|i| BackendConfig {
            addr: BackendAddr::parse(&format!("10.0.{}.{}:9000", i / 250, i % 250 + 1))
                .expect("addr"),
            weight: NonZeroU32::new(1 + (i % 3) as u32).expect("weight"),
            drain: false,
            max_connections: None,
        })
        .collect();
    let settings = PoolConfig::with_backends(backends);
    Pool::new("bench", &settings, None, &wsgate::balancer::Env::default())
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in [3, 30, 300] {
        let pool = pool(n);
        // Some load, uneven, so the comparison does real work.
        let _held: Vec<_> = (0..n * 4)
            .filter_map(|_| pool.pick(&[], &mut fastrand::Rng::with_seed(1)))
            .collect();
        for (i, b) in pool.backends.iter().enumerate() {
            b.set_remote((i * 7 % 13) as u64);
        }
        let mut rng = fastrand::Rng::with_seed(42);
        group.bench_with_input(BenchmarkId::from_parameter(n), &pool, |bench, pool| {
            bench.iter(|| black_box(pool.pick(black_box(&[]), &mut rng)))
        });
    }
    group.finish();
}

/// Client frames as a chat would send them: many small texts, some binary, a few
/// large, pings, fragments.
fn mixed_stream() -> Vec<u8> {
    let key = Some([0x12, 0x34, 0x56, 0x78]);
    let mut s = Vec::new();
    for i in 0..2000 {
        match i % 20 {
            0 => s.extend(encode(0x82, &vec![1u8; 16 * 1024], key)),
            1 => s.extend(encode(0x89, b"ping", key)),
            2 => {
                s.extend(encode(0x01, &[b'a'; 300], key));
                s.extend(encode(0x80, &[b'b'; 300], key));
            }
            n => s.extend(encode(0x81, &vec![b'x'; 20 + n * 10], key)),
        }
    }
    s
}

fn walker(c: &mut Criterion) {
    let stream = mixed_stream();
    let mut group = c.benchmark_group("walker");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    for chunk in [1500usize, 65536] {
        group.bench_with_input(
            BenchmarkId::new("mixed, read size", chunk),
            &chunk,
            |bench, &chunk| {
                bench.iter(|| {
                    let mut w = Walker::new(1 << 24);
                    let mut carry: Vec<u8> = Vec::new();
                    for piece in stream.chunks(chunk) {
                        let data: &[u8] = if carry.is_empty() {
                            piece
                        } else {
                            carry.extend_from_slice(piece);
                            &carry
                        };
                        let held = match w.walk(black_box(data)) {
                            Walk::Forward { held } => held,
                            Walk::TooBig { .. } | Walk::Broken { .. } => {
                                unreachable!("a well-formed stream under a 16 MiB limit")
                            }
                        };
                        carry = data[data.len() - held..].to_vec();
                    }
                    black_box(w.messages())
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, pick, walker);
criterion_main!(benches);
