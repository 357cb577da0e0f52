//! Sticky placement (`[pool.NAME.sticky]`): a request that belongs with earlier
//! ones goes to the same backend.
//!
//! - `cookie = "NAME"`: the first response to a client sets `NAME` to an opaque
//!   token of its backend (a hash of pool and address: never the address itself;
//!   the same on every instance). A request carrying it goes back there while that
//!   backend is healthy, not draining and not full; otherwise least-connections
//!   picks again and the cookie is replaced.
//! - `key = "query:NAME" | "header:NAME" | "cookie:NAME" | "path"`: weighted
//!   rendezvous hashing of the key over the pool's ready backends: every request
//!   with the same key lands on the same backend, and adding or removing one
//!   backend moves only the keys that must move (about 1/n). Requests without the
//!   key are balanced by least-connections.

use http::{HeaderValue, Request};

use crate::balancer::{Pool, fnv1a};
use crate::config::{IdentitySource, Sticky, StickyKey};

/// Where stickiness sends a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The backend (its index in the pool) to try first.
    pub preferred: Option<usize>,
    /// The cookie to set on the response for a backend, unless the request
    /// already carries the right one (cookie mode only).
    pub cookie: Option<String>,
    /// The cookie's value in the request, if any.
    pub had: Option<String>,
    /// `wsgate_sticky_total{result}`: `hit`, `miss` (the backend it belongs with
    /// cannot take it), `new` (nothing to stick to yet); `None` without stickiness.
    pub result: Option<&'static str>,
}

impl Placement {
    fn none() -> Placement {
        Placement {
            preferred: None,
            cookie: None,
            had: None,
            result: None,
        }
    }

    /// The `Set-Cookie` a response from backend `index` needs, if any.
    /// `Secure` when the client came over TLS.
    pub fn set_cookie(&self, pool: &Pool, index: usize, secure: bool) -> Option<HeaderValue> {
        let name = self.cookie.as_ref()?;
        let token = token(pool, index)?;
        if self.had.as_deref() == Some(token.as_str()) {
            return None;
        }
        let secure = if secure { "; Secure" } else { "" };
        HeaderValue::from_str(&format!(
            "{name}={token}; Path=/; HttpOnly; SameSite=Lax{secure}"
        ))
        .ok()
    }
}

/// The opaque token of backend `index` of `pool`.
pub fn token(pool: &Pool, index: usize) -> Option<String> {
    let backend = pool.backends.get(index)?;
    let mut bytes = pool.name.as_bytes().to_vec();
    bytes.extend_from_slice(&backend.id.to_le_bytes());
    Some(format!("{:016x}", fnv1a(&bytes)))
}

/// Decides where `req` goes by the pool's stickiness.
pub fn place<B>(pool: &Pool, req: &Request<B>) -> Placement {
    match &pool.settings.sticky {
        None => Placement::none(),
        Some(Sticky::Cookie(name)) => {
            let had = cookie(req, name);
            let found = had.as_ref().and_then(|value| {
                (0..pool.backends.len()).find(|i| token(pool, *i).as_deref() == Some(value))
            });
            let result = match found {
                Some(i) if pool.backends[i].ready() => "hit",
                _ if had.is_some() => "miss",
                _ => "new",
            };
            Placement {
                preferred: found.filter(|_| result == "hit"),
                cookie: Some(name.clone()),
                had,
                result: Some(result),
            }
        }
        Some(Sticky::Key(source)) => match key(req, source) {
            None => Placement {
                result: Some("new"),
                ..Placement::none()
            },
            Some(key) => {
                let preferred = rendezvous(pool, key.as_bytes());
                Placement {
                    preferred,
                    result: Some(if preferred.is_some() { "hit" } else { "miss" }),
                    ..Placement::none()
                }
            }
        },
    }
}

fn cookie<B>(req: &Request<B>, name: &str) -> Option<String> {
    crate::presence::identity(&IdentitySource::Cookie(name.to_string()), req)
        .ok()
        .flatten()
}

/// The request's sticky key, if it has one.
fn key<B>(req: &Request<B>, source: &StickyKey) -> Option<String> {
    let source = match source {
        StickyKey::Path => return Some(req.uri().path().to_string()),
        StickyKey::Query(n) => IdentitySource::Query(n.clone()),
        StickyKey::Header(h) => IdentitySource::Header(h.clone()),
        StickyKey::Cookie(c) => IdentitySource::Cookie(c.clone()),
    };
    crate::presence::identity(&source, req).ok().flatten()
}

/// Weighted rendezvous hashing: the ready backend with the highest
/// `weight / -ln(u)`, `u` a uniform hash of key and backend in (0, 1).
pub fn rendezvous(pool: &Pool, key: &[u8]) -> Option<usize> {
    let key = fnv1a(key);
    let mut best: Option<(usize, f64)> = None;
    for (i, backend) in pool.backends.iter().enumerate() {
        if !backend.ready() {
            continue;
        }
        let u = ((mix(key ^ backend.id) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(backend.weight()) / -u.ln();
        if best.is_none_or(|(_, s)| score > s) {
            best = Some((i, score));
        }
    }
    best.map(|(i, _)| i)
}

/// SplitMix64's finaliser: spreads the bits of a hash.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::Env;
    use crate::config::{BackendAddr, BackendConfig, PoolConfig};
    use std::num::NonZeroU32;

    fn pool(weights: &[u32]) -> Pool {
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, w)| BackendConfig {
                addr: BackendAddr::parse(&format!("10.0.0.{}:9000", i + 1)).unwrap(),
                weight: NonZeroU32::new(*w).unwrap(),
                drain: false,
                max_connections: None,
            })
            .collect();
        Pool::new(
            "p",
            &PoolConfig::with_backends(backends),
            None,
            &Env::default(),
        )
    }

    fn placements(pool: &Pool, keys: u32) -> Vec<usize> {
        (0..keys)
            .map(|k| rendezvous(pool, format!("room-{k}").as_bytes()).expect("a backend"))
            .collect()
    }

    #[test]
    fn keys_spread_by_weight_and_move_only_to_a_new_backend() {
        // Weights 1:1:1:2 (as 4:4:4:8, so that a newcomer of 5 takes 20%).
        let four = pool(&[4, 4, 4, 8]);
        let before = placements(&four, 1000);
        let mut shares = [0u32; 4];
        for b in &before {
            shares[*b] += 1;
        }
        // Weights 1:1:1:2 of 1,000 keys: 200, 200, 200, 400, each within ±20%.
        for (share, expected) in shares.iter().zip([200.0, 200.0, 200.0, 400.0]) {
            let off = (f64::from(*share) - expected).abs() / expected;
            assert!(off <= 0.2, "{shares:?}");
        }
        // A fifth backend (5 of 25: 20%): 17-23% of the keys move to it, and none
        // moves between two old backends.
        let five = pool(&[4, 4, 4, 8, 5]);
        let after = placements(&five, 1000);
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        assert!((170..=230).contains(&moved), "{moved} of 1000 moved");
        assert!(
            before.iter().zip(&after).all(|(a, b)| a == b || *b == 4),
            "a key moved between two old backends"
        );
    }

    #[test]
    fn tokens_are_opaque_and_stable() {
        let p = pool(&[1, 1]);
        let t = token(&p, 0).unwrap();
        assert_eq!(t.len(), 16);
        assert!(!t.contains("10.0.0"));
        assert_eq!(token(&pool(&[1, 1]), 0).unwrap(), t);
        assert_ne!(token(&p, 1).unwrap(), t);
    }
}
