//! The open connections: what the server knows of each, and the cap on
//! their number.
//!
//! Each connection has a [`ConnState`], shared by its task, its IO and its
//! calls, made of atomics so a call updates it without a lock: the calls
//! open on it (for its idle deadline, and for the count of calls a drain
//! cuts), since when it has been idle, whether its handshake is complete.
//!
//! [`Connections`] holds them all behind one `std::sync::Mutex` (nothing
//! awaits under it; it is taken when a connection opens or closes, at a
//! drain timeout and by `/metrics`) and keeps the cap, `--max-connections`,
//! so that a flood of idle sockets cannot lock a working client out: when
//! the cap is reached, a new connection still gets in, and a connection
//! makes room for it:
//!
//! 1. the oldest one that has not completed its handshake (it is closed at
//!    once: it never sent a request);
//! 2. else the one idle the longest, with no call open (it gets a graceful
//!    GOAWAY or `Connection: close`: a client that comes back reconnects);
//! 3. else none: every connection has a call open, and the new one is
//!    closed at once.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// What the server knows of one open connection (see the module docs).
#[derive(Debug)]
pub struct ConnState {
    id: u64,
    /// When the server started: times are kept as milliseconds since.
    epoch: Instant,
    open_calls: AtomicUsize,
    /// Milliseconds since `epoch` when the last call ended (or the
    /// connection was accepted).
    idle_since: AtomicU64,
    handshake: AtomicBool,
    /// Wakes the connection's task when the handshake completes.
    handshake_done: Notify,
    /// Set, under the table's lock, when the connection must make room.
    evicted: AtomicBool,
    /// Wakes the connection's task when it must make room.
    evict: Notify,
}

impl ConnState {
    fn new(id: u64, epoch: Instant) -> Self {
        Self {
            id,
            epoch,
            open_calls: AtomicUsize::new(0),
            idle_since: AtomicU64::new(millis_since(epoch)),
            handshake: AtomicBool::new(false),
            handshake_done: Notify::new(),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        }
    }

    /// A call arrived on this connection.
    pub fn call_started(&self) {
        self.open_calls.fetch_add(1, Ordering::Relaxed);
    }

    /// A call ended: its response was sent whole, or abandoned.
    pub fn call_ended(&self) {
        // The time first: whoever sees no open call sees a fresh time.
        self.idle_since
            .store(millis_since(self.epoch), Ordering::Relaxed);
        self.open_calls.fetch_sub(1, Ordering::Release);
    }

    /// Calls open now.
    pub fn open_calls(&self) -> usize {
        self.open_calls.load(Ordering::Acquire)
    }

    /// How long the connection has had no call open (`None`: one is open).
    pub fn idle_for(&self) -> Option<Duration> {
        if self.open_calls() > 0 {
            return None;
        }
        let since = self.idle_since.load(Ordering::Relaxed);
        Some(Duration::from_millis(
            millis_since(self.epoch).saturating_sub(since),
        ))
    }

    /// The IO saw the handshake complete.
    pub fn set_handshake(&self) {
        if !self.handshake.swap(true, Ordering::Release) {
            self.handshake_done.notify_one();
        }
    }

    pub fn handshake(&self) -> bool {
        self.handshake.load(Ordering::Acquire)
    }

    /// Resolves once the handshake is complete.
    pub async fn handshake_completed(&self) {
        if !self.handshake() {
            self.handshake_done.notified().await;
        }
    }

    /// Resolves once the table chose this connection to make room.
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }
}

fn millis_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

/// The open connections and their cap (see the module docs).
#[derive(Debug)]
pub struct Connections {
    limit: usize,
    epoch: Instant,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    live: HashMap<u64, Arc<ConnState>>,
    /// Connections in the cap: the live ones not making room.
    counted: usize,
    /// Ids in the order they were accepted, for the oldest connection
    /// without a handshake; ids of connections that completed theirs or
    /// closed are dropped from the front as they come.
    young: VecDeque<u64>,
}

/// Why a connection was refused.
#[derive(Debug)]
pub struct Full;

impl Connections {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            limit: limit.max(1),
            epoch: Instant::now(),
            table: Mutex::new(Table::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits a new connection, making room for it at the cap. The entry
    /// leaves the table when dropped.
    pub fn admit(self: &Arc<Self>) -> Result<Entry, Full> {
        let mut table = self.lock();
        let table = &mut *table;
        while let Some(id) = table.young.front() {
            match table.live.get(id) {
                Some(state) if !state.handshake() && !state.evicted.load(Ordering::Relaxed) => {
                    break
                }
                _ => {
                    table.young.pop_front();
                }
            }
        }
        if table.counted >= self.limit {
            let victim = table
                .oldest_without_handshake()
                .or_else(|| table.idle_longest());
            let Some(victim) = victim else {
                return Err(Full);
            };
            victim.evicted.store(true, Ordering::Relaxed);
            victim.evict.notify_one();
            table.counted -= 1;
        }
        let id = table.next_id;
        table.next_id += 1;
        let state = Arc::new(ConnState::new(id, self.epoch));
        table.live.insert(id, state.clone());
        table.young.push_back(id);
        table.counted += 1;
        Ok(Entry {
            connections: self.clone(),
            state,
        })
    }

    /// The calls open now, and on how many connections.
    pub fn open_calls(&self) -> (usize, usize) {
        self.lock()
            .live
            .values()
            .map(|c| c.open_calls())
            .filter(|&n| n > 0)
            .fold((0, 0), |(calls, conns), n| (calls + n, conns + 1))
    }

    /// Connections open now (those making room included).
    pub fn len(&self) -> usize {
        self.lock().live.len()
    }
}

impl Table {
    fn oldest_without_handshake(&self) -> Option<Arc<ConnState>> {
        self.young
            .iter()
            .filter_map(|id| self.live.get(id))
            .find(|c| !c.handshake() && !c.evicted.load(Ordering::Relaxed))
            .cloned()
    }

    fn idle_longest(&self) -> Option<Arc<ConnState>> {
        self.live
            .values()
            .filter(|c| !c.evicted.load(Ordering::Relaxed))
            .filter_map(|c| c.idle_for().map(|idle| (idle, c)))
            .max_by_key(|(idle, c)| (*idle, std::cmp::Reverse(c.id)))
            .map(|(_, c)| c.clone())
    }
}

/// A connection's place in the table; it leaves when dropped.
#[derive(Debug)]
pub struct Entry {
    connections: Arc<Connections>,
    state: Arc<ConnState>,
}

impl Entry {
    pub fn state(&self) -> &Arc<ConnState> {
        &self.state
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        let mut table = self.connections.lock();
        if table.live.remove(&self.state.id).is_some()
            && !self.state.evicted.load(Ordering::Relaxed)
        {
            table.counted -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_a_connection_without_handshake_makes_room_first() {
        let connections = Connections::new(3);
        let a = connections.admit().unwrap();
        let b = connections.admit().unwrap();
        let c = connections.admit().unwrap();
        a.state().set_handshake();
        c.state().set_handshake();
        // b never spoke: it makes room.
        let d = connections.admit().unwrap();
        assert!(b.state().evicted.load(Ordering::Relaxed));
        assert!(!a.state().evicted.load(Ordering::Relaxed));
        d.state().set_handshake();
        // Now every connection spoke: the one idle the longest goes.
        a.state().call_started();
        std::thread::sleep(Duration::from_millis(5));
        let e = connections.admit().unwrap();
        assert!(c.state().evicted.load(Ordering::Relaxed));
        assert_eq!(connections.len(), 5);
        drop((b, c));
        assert_eq!(connections.len(), 3);
        // Every connection has a call open: a new one is refused.
        e.state().call_started();
        d.state().call_started();
        e.state().set_handshake();
        assert!(connections.admit().is_err());
        assert_eq!(connections.open_calls(), (3, 3));
        a.state().call_ended();
        assert!(a.state().idle_for().is_some());
        assert!(connections.admit().is_ok());
    }
}
