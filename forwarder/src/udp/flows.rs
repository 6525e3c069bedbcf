//! The flow table: a map from client address to slot, and the slots in a
//! doubly linked list ordered by last activity (head = most recent), so the
//! relay finds a flow, marks it active, evicts the least recently active
//! one and expires idle ones without a scan or an allocation per datagram.
//! Pure data: tested without sockets.

use std::collections::HashMap;
use std::net::SocketAddr;

const NIL: usize = usize::MAX;

struct Slot<T> {
    key: SocketAddr,
    val: Option<T>,
    last_ms: u64,
    prev: usize,
    next: usize,
}

/// Flows by client address with O(1) lookup, touch, eviction of the least
/// recently active and expiry. Slot indices are stable while a flow lives
/// (they are the flow sockets' epoll tokens) and reused after. Capacity is
/// reserved up front: inserting never allocates once `cap` slots exist.
pub struct FlowTable<T> {
    map: HashMap<SocketAddr, usize>,
    slots: Vec<Slot<T>>,
    free: Vec<usize>,
    head: usize,
    tail: usize,
    cap: usize,
}

impl<T> FlowTable<T> {
    /// A table for at most `cap` flows (at least 1).
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        FlowTable {
            map: HashMap::with_capacity(cap),
            slots: Vec::with_capacity(cap),
            free: Vec::with_capacity(cap),
            head: NIL,
            tail: NIL,
            cap,
        }
    }

    /// Live flows.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The slot of `key`'s flow.
    pub fn find(&self, key: &SocketAddr) -> Option<usize> {
        self.map.get(key).copied()
    }

    pub fn get(&self, idx: usize) -> Option<&T> {
        self.slots.get(idx).and_then(|s| s.val.as_ref())
    }

    pub fn get_mut(&mut self, idx: usize) -> Option<&mut T> {
        self.slots.get_mut(idx).and_then(|s| s.val.as_mut())
    }

    /// The client address of a live slot.
    #[cfg(test)]
    pub fn key(&self, idx: usize) -> Option<SocketAddr> {
        self.slots
            .get(idx)
            .filter(|s| s.val.is_some())
            .map(|s| s.key)
    }

    fn unlink(&mut self, idx: usize) {
        let (prev, next) = (self.slots[idx].prev, self.slots[idx].next);
        match prev {
            NIL => self.head = next,
            p => self.slots[p].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n].prev = prev,
        }
    }

    fn push_front(&mut self, idx: usize) {
        self.slots[idx].prev = NIL;
        self.slots[idx].next = self.head;
        if self.head != NIL {
            self.slots[self.head].prev = idx;
        }
        self.head = idx;
        if self.tail == NIL {
            self.tail = idx;
        }
    }

    /// Marks a flow active at `now_ms`.
    pub fn touch(&mut self, idx: usize, now_ms: u64) {
        if self.get(idx).is_none() {
            return;
        }
        self.slots[idx].last_ms = now_ms;
        if self.head != idx {
            self.unlink(idx);
            self.push_front(idx);
        }
    }

    /// Adds a flow for `key` (which must not be present). When the table is
    /// full the least recently active flow is removed first and returned.
    pub fn insert(
        &mut self,
        key: SocketAddr,
        val: T,
        now_ms: u64,
    ) -> (usize, Option<(SocketAddr, T)>) {
        debug_assert!(!self.map.contains_key(&key));
        let evicted = if self.len() >= self.cap {
            self.remove(self.tail)
        } else {
            None
        };
        let slot = Slot {
            key,
            val: Some(val),
            last_ms: now_ms,
            prev: NIL,
            next: NIL,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.push_front(idx);
        self.map.insert(key, idx);
        (idx, evicted)
    }

    /// Removes a live flow.
    pub fn remove(&mut self, idx: usize) -> Option<(SocketAddr, T)> {
        let val = self.slots.get_mut(idx)?.val.take()?;
        self.unlink(idx);
        let key = self.slots[idx].key;
        self.map.remove(&key);
        self.free.push(idx);
        Some((key, val))
    }

    /// Removes and returns the least recently active flow.
    pub fn pop_lru(&mut self) -> Option<(SocketAddr, T)> {
        self.remove(self.tail)
    }

    /// Whether the table holds its cap of flows.
    pub fn is_full(&self) -> bool {
        self.len() >= self.cap
    }

    /// Removes and returns the least recently active flow if it has been
    /// idle for `idle_ms` or more at `now_ms`.
    pub fn pop_expired(&mut self, now_ms: u64, idle_ms: u64) -> Option<(SocketAddr, T)> {
        let t = self.tail;
        if t == NIL || now_ms.saturating_sub(self.slots[t].last_ms) < idle_ms {
            return None;
        }
        self.remove(t)
    }

    /// Flows from least to most recently active.
    #[cfg(test)]
    pub fn lru_order(&self) -> Vec<SocketAddr> {
        let mut out = Vec::with_capacity(self.len());
        let mut i = self.tail;
        while i != NIL {
            out.push(self.slots[i].key);
            i = self.slots[i].prev;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn lru_order_follows_activity() {
        let mut t = FlowTable::new(8);
        for p in 1..=4 {
            t.insert(a(p), p, p as u64);
        }
        assert_eq!(t.lru_order(), vec![a(1), a(2), a(3), a(4)]);
        let i2 = t.find(&a(2)).unwrap();
        t.touch(i2, 10);
        assert_eq!(t.lru_order(), vec![a(1), a(3), a(4), a(2)]);
        let i1 = t.find(&a(1)).unwrap();
        t.touch(i1, 11);
        assert_eq!(t.lru_order(), vec![a(3), a(4), a(2), a(1)]);
        // Touching the most recent one changes nothing.
        t.touch(i1, 12);
        assert_eq!(t.lru_order(), vec![a(3), a(4), a(2), a(1)]);
        assert_eq!(t.remove(t.find(&a(4)).unwrap()), Some((a(4), 4)));
        assert_eq!(t.lru_order(), vec![a(3), a(2), a(1)]);
        assert_eq!(t.len(), 3);
        assert_eq!(t.find(&a(4)), None);
    }

    #[test]
    fn the_cap_evicts_the_least_recently_active() {
        let mut t = FlowTable::new(3);
        for p in 1..=3 {
            let (_, ev) = t.insert(a(p), p, p as u64);
            assert!(ev.is_none());
        }
        // Flow 1 is used again: flow 2 is now the least recently active.
        t.touch(t.find(&a(1)).unwrap(), 5);
        let (idx, ev) = t.insert(a(4), 4, 6);
        assert_eq!(ev, Some((a(2), 2)));
        assert_eq!(t.len(), 3);
        // The freed slot is reused: no growth beyond the cap.
        assert!(idx < 3, "{idx}");
        assert_eq!(t.get(idx), Some(&4));
        assert_eq!(t.key(idx), Some(a(4)));
        let (_, ev) = t.insert(a(5), 5, 7);
        assert_eq!(ev, Some((a(3), 3)));
        assert_eq!(t.lru_order(), vec![a(1), a(4), a(5)]);
        assert!(t.slots.len() <= 3);
    }

    #[test]
    fn expiry_takes_only_idle_flows_oldest_first() {
        let mut t = FlowTable::new(10);
        t.insert(a(1), 1, 0);
        t.insert(a(2), 2, 100);
        t.insert(a(3), 3, 200);
        t.touch(t.find(&a(1)).unwrap(), 250);
        // idle timeout 100 ms at t=260: flows 2 (160 ms idle) and 3 (60
        // ms)... only 2 qualifies; 1 was touched at 250.
        assert_eq!(t.pop_expired(260, 100), Some((a(2), 2)));
        assert_eq!(t.pop_expired(260, 100), None);
        assert_eq!(t.pop_expired(300, 100), Some((a(3), 3)));
        assert_eq!(t.pop_expired(349, 100), None);
        assert_eq!(t.pop_expired(350, 100), Some((a(1), 1)));
        assert_eq!(t.len(), 0);
        assert_eq!(t.pop_expired(u64::MAX, 0), None);
    }

    #[test]
    fn a_full_table_churns_without_growing() {
        let mut t = FlowTable::new(100);
        for p in 0..10_000u16 {
            let now = p as u64;
            match t.find(&a(p % 150)) {
                Some(i) => t.touch(i, now),
                None => {
                    t.insert(a(p % 150), p, now);
                }
            }
            assert!(t.len() <= 100);
        }
        assert_eq!(t.len(), 100);
        assert!(t.slots.len() <= 100);
        assert_eq!(t.lru_order().len(), 100);
    }
}
