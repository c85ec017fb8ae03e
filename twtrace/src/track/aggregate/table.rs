//! One grouping's groups, in slots a live TIME_WAIT socket refers to by index, folded into
//! `other` when there are too many (see the parent module).

use foldhash::{HashMap, HashMapExt as _, HashSetExt as _};

use super::{Key, group::Group};
use crate::{
    kernel::decode::Process,
    track::lifecycle::{Reason, Substate},
};

/// Reference count of a slot that is not live: folded into `other` (the count of live TIME_WAIT
/// sockets still referring to it), or free (0).
pub(super) const LIVE: u32 = u32::MAX;

/// One grouping's groups, bounded. Slots are what TIME_WAIT sockets refer to; a slot costs
/// 12 bytes once its group is folded, so the references of a million sockets stay cheap.
#[derive(Debug)]
pub(super) struct Table {
    pub(super) map: HashMap<Key, u32>,
    /// Per slot: `LIVE`, or the references left to a folded slot (0: free).
    pub(super) refs: Vec<u32>,
    /// Per slot: the group while it is live.
    pub(super) groups: Vec<Option<Box<(Key, Group)>>>,
    pub(super) free: Vec<u32>,
    /// Boxes of folded groups, for the next new groups.
    #[expect(clippy::vec_box, reason = "the boxes move into `groups` as they are")]
    pub(super) spare: Vec<Box<(Key, Group)>>,
    /// Never folded (exported as metric series: their counters must not go back).
    pub(super) pinned: foldhash::HashSet<Key>,
    pub(super) other: Group,
    pub(super) folded_groups: u64,
    pub(super) cap: usize,
    /// The slot `slot_for` returned last (`u32::MAX`: none). Births come in runs of one
    /// process, one namespace, one peer: comparing with the last key spares most lookups of
    /// the namespace, command and process groupings their hashing.
    last: u32,
}

impl Table {
    pub(super) fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            refs: Vec::new(),
            groups: Vec::new(),
            free: Vec::new(),
            spare: Vec::new(),
            pinned: foldhash::HashSet::new(),
            other: Group::default(),
            folded_groups: 0,
            cap: cap.max(1),
            last: u32::MAX,
        }
    }

    pub(super) fn slot_for(&mut self, key: Key) -> u32 {
        // A slot holds its key exactly while its group is live (`fold` takes the box).
        if let Some(Some(b)) = self.groups.get(self.last as usize)
            && b.0 == key
        {
            return self.last;
        }
        if let Some(&s) = self.map.get(&key) {
            self.last = s;
            return s;
        }
        if self.map.len() >= 2 * self.cap {
            self.compact();
        }
        // A folded group's box is reused: with client sockets grouped by local port, a new group
        // is made for nearly every birth.
        let entry = Some(match self.spare.pop() {
            Some(mut b) => {
                b.0 = key.clone();
                b
            }
            None => Box::new((key.clone(), Group::default())),
        });
        let s = match self.free.pop() {
            Some(s) => {
                self.refs[s as usize] = LIVE;
                self.groups[s as usize] = entry;
                s
            }
            None => {
                self.refs.push(LIVE);
                self.groups.push(entry);
                (self.refs.len() - 1) as u32
            }
        };
        self.map.insert(key, s);
        self.last = s;
        s
    }

    /// The group slot `s` counts in: its own while live, `other` once folded (None: free).
    pub(super) fn group_at(&mut self, s: u32) -> Option<&mut Group> {
        match self.refs.get(s as usize).copied() {
            Some(LIVE) => self.groups[s as usize].as_mut().map(|b| &mut b.1),
            Some(n) if n > 0 => Some(&mut self.other),
            _ => None,
        }
    }

    /// A live socket's reference to slot `s` ends: a folded slot is freed with its last one.
    pub(super) fn release(&mut self, s: u32) {
        let i = s as usize;
        if let Some(n) = self.refs.get(i).copied()
            && n != LIVE
            && n > 0
        {
            self.refs[i] = n - 1;
            if n == 1 {
                self.free.push(s);
            }
        }
    }

    /// A socket entering the group at slot `s` (just returned by `slot_for`, so live).
    pub(super) fn enter(
        &mut self,
        s: u32,
        sec: u64,
        owner: Option<&Process>,
        counted: bool,
        substate: Substate,
    ) {
        if let Some(g) = self.group_at(s) {
            g.enter(sec, owner, counted, substate);
        }
    }

    pub(super) fn exit(
        &mut self,
        s: u32,
        reason: Reason,
        lifetime_ms: Option<u64>,
        substate: Substate,
    ) {
        if let Some(g) = self.group_at(s) {
            g.exit(reason, lifetime_ms, substate);
        }
        self.release(s);
    }

    /// Removes a seeded socket replaced by its own birth (not an end).
    pub(super) fn forget(&mut self, s: u32, substate: Substate) {
        if let Some(g) = self.group_at(s) {
            g.leave(substate);
        }
        self.release(s);
    }

    pub(super) fn rearm(&mut self, s: u32, from: Substate, to: Substate) {
        if let Some(g) = self.group_at(s) {
            g.rearm(from, to);
        }
    }

    /// Folds the smallest groups into `other` until at most `cap` remain.
    pub(super) fn compact(&mut self) {
        if self.map.len() <= self.cap {
            return;
        }
        // The pinned keys' slots, found once: at most `cap` lookups rather than one per group
        // (and no allocation the size of `groups`, which folded slots can make long).
        let mut pinned: Vec<u32> = self
            .pinned
            .iter()
            .filter_map(|k| self.map.get(k).copied())
            .collect();
        pinned.sort_unstable();
        let mut ranked: Vec<(u64, u64, u32)> = self
            .map
            .values()
            .filter_map(|&s| {
                let (_, g) = &**self.groups[s as usize].as_ref()?;
                // Pinned groups rank above all others, so they are never folded.
                let held = if pinned.binary_search(&s).is_ok() {
                    u64::MAX
                } else {
                    g.timewait()
                };
                Some((held, g.entered + g.connect_failed(), s))
            })
            .collect();
        // Largest first: TIME_WAIT now, then births. Only which side of `cap` a group falls
        // matters, not the order within either side.
        ranked.select_nth_unstable_by_key(self.cap, |&(tw, entered, _)| {
            std::cmp::Reverse((tw, entered))
        });
        for &(_, _, s) in &ranked[self.cap..] {
            self.fold(s);
        }
        self.map.shrink_to(self.cap * 2);
    }

    /// Folds every group of a namespace (pinned ones too: the namespace is gone).
    pub(super) fn fold_netns(&mut self, netns: u32) {
        let slots: Vec<u32> = self
            .map
            .iter()
            .filter(|(k, _)| k.netns == netns)
            .map(|(_, &s)| s)
            .collect();
        for s in slots {
            if let Some(entry) = self.groups[s as usize].as_ref() {
                self.pinned.remove(&entry.0);
            }
            self.fold(s);
        }
    }

    /// Folds the live group at slot `s` into `other`; its slot keeps the references of the
    /// TIME_WAIT sockets still counted in it.
    pub(super) fn fold(&mut self, s: u32) {
        let Some(entry) = self.groups[s as usize].take() else {
            return;
        };
        self.map.remove(&entry.0);
        self.other.absorb(&entry.1);
        self.folded_groups += 1;
        let tw = entry.1.timewait();
        self.refs[s as usize] = tw.min(u32::MAX as u64 - 1) as u32;
        if tw == 0 {
            self.free.push(s);
        }
        // Boxes, live groups and spares, never exceed 2 * cap (a new group takes a spare).
        if self.spare.len() < self.cap {
            let mut entry = entry;
            entry.1.reset();
            self.spare.push(entry);
        }
    }

    pub(super) fn groups(&self) -> impl Iterator<Item = (&Key, &Group)> {
        self.groups
            .iter()
            .filter_map(|g| g.as_ref().map(|b| (&b.0, &b.1)))
    }

    pub(super) fn approx_bytes(&self) -> usize {
        self.refs.capacity() * 4
            + self.groups.capacity() * 8
            + self.map.capacity() * (size_of::<Key>() + 5)
            + self.free.capacity() * 4
            + self.spare.capacity() * 8
            + self
                .groups()
                .chain(self.spare.iter().map(|b| (&b.0, &b.1)))
                .map(|(_, g)| {
                    size_of::<(Key, Group)>()
                        + g.lifetimes.buckets.capacity() * 8
                        + g.owners.capacity() * 48
                })
                .sum::<usize>()
    }
}
