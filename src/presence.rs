//! Presence: which user is connected through which instance to which backend.
//!
//! Each route may name where a connection's identity comes from (`query:NAME`,
//! `header:NAME`, `cookie:NAME`). Connections with an identity are kept in this
//! instance's table while they last ([`PresenceGuard`] removes them in `Drop`), and
//! each join and leave becomes an event. The cluster task publishes both.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use http::Request;
use serde::{Deserialize, Serialize};

use crate::config::IdentitySource;

/// Longest identity accepted; a longer one is a 400.
pub const MAX_IDENTITY: usize = 256;

/// Events kept while they cannot be published (Redis down); older ones are dropped.
const MAX_QUEUED_EVENTS: usize = 10_000;

/// Users remembered as changed while they cannot be published (Redis down, a flood
/// of distinct ids). Past it the set is dropped and the next publish replaces this
/// instance's whole presence hash instead, which needs no change list.
const MAX_DIRTY_USERS: usize = 65_536;

/// One connection of one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub user: String,
    pub instance: String,
    pub pool: String,
    pub backend: String,
    /// Connection id, unique within its instance.
    pub conn: u64,
    /// When the connection opened, in milliseconds since the Unix epoch.
    pub since: u64,
}

/// A join or leave, as published on the presence channel:
/// `{"type":"join","user":"ada","instance":"a","pool":"chat","backend":"10.0.0.1:9000","conn":7,"since":1764400000000,"at":1764400000000}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    #[serde(rename = "type")]
    pub kind: EventKind,
    #[serde(flatten)]
    pub entry: PresenceEntry,
    /// When it happened, in milliseconds since the Unix epoch.
    pub at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    Join,
    Leave,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads the identity `source` names from an upgrade request. `Ok(None)` when the
/// request carries none; `Err` when it is longer than [`MAX_IDENTITY`].
pub fn identity<B>(
    source: &IdentitySource,
    req: &Request<B>,
) -> Result<Option<String>, &'static str> {
    let found = match source {
        IdentitySource::Query(name) => req.uri().query().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        }),
        IdentitySource::Header(name) => req
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_string()),
        IdentitySource::Cookie(name) => req
            .headers()
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(cookie::Cookie::split_parse)
            .find_map(|c| {
                let c = c.ok()?;
                (c.name() == name).then(|| c.value_trimmed().to_string())
            }),
    };
    match found {
        Some(id) if id.len() > MAX_IDENTITY => {
            Err("the presence identity is longer than 256 bytes")
        }
        Some(id) if id.is_empty() => Ok(None),
        other => Ok(other),
    }
}

/// This instance's presence table and the changes not yet published.
#[derive(Debug, Default)]
pub struct Presence {
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    users: HashMap<String, Vec<PresenceEntry>>,
    /// Users whose entries changed since the last publish.
    dirty: HashSet<String>,
    /// The dirty set overflowed and was dropped: only a full republish is right.
    resync: bool,
    events: VecDeque<PresenceEvent>,
}

/// What changed since the last call: each dirty user with its entries now (empty:
/// gone), and the events in order.
#[derive(Debug, Default)]
pub struct Changes {
    pub users: Vec<(String, Vec<PresenceEntry>)>,
    pub events: Vec<PresenceEvent>,
    /// Too much changed to list: publish the whole table instead.
    pub resync: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.events.is_empty()
    }
}

impl Presence {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding this lock leaves the table consistent (every
        // mutation is a single push or remove), so a poisoned lock is still usable.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a connection; the guard removes it when dropped.
    pub fn join(self: &Arc<Self>, entry: PresenceEntry) -> PresenceGuard {
        let guard = PresenceGuard {
            presence: self.clone(),
            user: entry.user.clone(),
            conn: entry.conn,
        };
        {
            let mut table = self.lock();
            mark_dirty(&mut table, &entry.user);
            push_event(&mut table, EventKind::Join, entry.clone());
            table
                .users
                .entry(entry.user.clone())
                .or_default()
                .push(entry);
        }
        guard
    }

    fn leave(&self, user: &str, conn: u64) {
        {
            let mut table = self.lock();
            let Some(entries) = table.users.get_mut(user) else {
                return;
            };
            let Some(at) = entries.iter().position(|e| e.conn == conn) else {
                return;
            };
            let entry = entries.swap_remove(at);
            if entries.is_empty() {
                table.users.remove(user);
            }
            mark_dirty(&mut table, user);
            push_event(&mut table, EventKind::Leave, entry);
        }
    }

    /// Takes what changed since the last call.
    pub fn take_changes(&self) -> Changes {
        let mut table = self.lock();
        let dirty: Vec<String> = table.dirty.drain().collect();
        let users = dirty
            .into_iter()
            .map(|u| {
                let entries = table.users.get(&u).cloned().unwrap_or_default();
                (u, entries)
            })
            .collect();
        Changes {
            users,
            events: table.events.drain(..).collect(),
            resync: std::mem::take(&mut table.resync),
        }
    }

    /// Every user with entries, for a full republish; clears the dirty set.
    pub fn snapshot(&self) -> Vec<(String, Vec<PresenceEntry>)> {
        let mut table = self.lock();
        table.dirty.clear();
        table.resync = false;
        table
            .users
            .iter()
            .map(|(u, e)| (u.clone(), e.clone()))
            .collect()
    }

    /// This instance's entries for `user`.
    pub fn local(&self, user: &str) -> Vec<PresenceEntry> {
        self.lock().users.get(user).cloned().unwrap_or_default()
    }

    /// Each user in this instance's table with its number of connections.
    pub fn per_user(&self) -> Vec<(String, usize)> {
        self.lock()
            .users
            .iter()
            .map(|(u, e)| (u.clone(), e.len()))
            .collect()
    }
}

fn mark_dirty(table: &mut Table, user: &str) {
    if table.resync {
        return;
    }
    if table.dirty.len() >= MAX_DIRTY_USERS && !table.dirty.contains(user) {
        table.dirty = HashSet::new();
        table.resync = true;
        return;
    }
    table.dirty.insert(user.to_string());
}

fn push_event(table: &mut Table, kind: EventKind, entry: PresenceEntry) {
    if table.events.len() >= MAX_QUEUED_EVENTS {
        table.events.pop_front();
    }
    table.events.push_back(PresenceEvent {
        kind,
        entry,
        at: now_ms(),
    });
}

/// Holds one connection's presence entry; dropping it records the leave.
#[derive(Debug)]
pub struct PresenceGuard {
    presence: Arc<Presence>,
    user: String,
    conn: u64,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.presence.leave(&self.user, self.conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::get(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn reads_identity_from_each_source() {
        let r = req(
            "/ws?room=1&user=ada%20l%2B&x",
            &[("x-user", " bob "), ("cookie", "a=1; sid=\"carol\"")],
        );
        let q = IdentitySource::parse("query:user").unwrap();
        let h = IdentitySource::parse("header:x-user").unwrap();
        let c = IdentitySource::parse("cookie:sid").unwrap();
        assert_eq!(identity(&q, &r), Ok(Some("ada l+".to_string())));
        assert_eq!(identity(&h, &r), Ok(Some("bob".to_string())));
        assert_eq!(identity(&c, &r), Ok(Some("carol".to_string())));
        let none = req("/ws?user=", &[]);
        assert_eq!(identity(&q, &none), Ok(None));
        let long = req(&format!("/ws?user={}", "x".repeat(300)), &[]);
        assert!(identity(&q, &long).is_err());
        let odd = req("/ws?user=100%&x=1", &[]);
        assert_eq!(identity(&q, &odd), Ok(Some("100%".to_string())));
    }

    #[test]
    fn changed_users_are_bounded_and_overflow_asks_for_a_full_republish() {
        let presence = Arc::new(Presence::default());
        let entry = |user: String| PresenceEntry {
            user,
            instance: "i".into(),
            pool: "p".into(),
            backend: "b".into(),
            conn: 1,
            since: 1,
        };
        // Distinct ids joining and leaving while nothing is published.
        for i in 0..MAX_DIRTY_USERS + 10 {
            drop(presence.join(entry(format!("u{i}"))));
            assert!(presence.lock().dirty.len() <= MAX_DIRTY_USERS);
        }
        let kept = presence.join(entry("stays".into()));
        assert!(presence.lock().events.len() <= MAX_QUEUED_EVENTS);
        let changes = presence.take_changes();
        assert!(changes.resync, "overflow asks for a full republish");
        assert!(changes.users.is_empty());
        assert_eq!(presence.snapshot().len(), 1, "the table itself is exact");
        // Back to normal after the republish.
        drop(kept);
        let changes = presence.take_changes();
        assert!(!changes.resync);
        assert_eq!(changes.users, vec![("stays".to_string(), vec![])]);
    }

    #[test]
    fn joins_and_leaves_become_changes_and_events() {
        let presence = Arc::new(Presence::default());
        let entry = |conn| PresenceEntry {
            user: "ada".into(),
            instance: "i".into(),
            pool: "p".into(),
            backend: "b".into(),
            conn,
            since: 1,
        };
        let one = presence.join(entry(1));
        let two = presence.join(entry(2));
        assert_eq!(presence.local("ada").len(), 2);
        let changes = presence.take_changes();
        assert_eq!(
            changes.users,
            vec![("ada".to_string(), vec![entry(1), entry(2)])]
        );
        assert_eq!(changes.events.len(), 2);
        drop(one);
        drop(two);
        let changes = presence.take_changes();
        assert_eq!(changes.users, vec![("ada".to_string(), vec![])]);
        let kinds: Vec<_> = changes.events.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec![EventKind::Leave, EventKind::Leave]);
        assert!(presence.per_user().is_empty());
        let json = serde_json::to_string(&changes.events[0]).unwrap();
        assert!(
            json.starts_with("{\"type\":\"leave\",\"user\":\"ada\""),
            "{json}"
        );
    }
}
