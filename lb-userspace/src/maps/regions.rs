//! Where each group's two table halves live in `LB_TABLES`.
//!
//! Every half of every group has an extent of its own (base, capacity). A half is rewritten only
//! while it is inactive, so when a table outgrows its half, the half gets a new extent and the
//! old one is freed. A group no listener uses any more gives both extents back. Freed extents
//! coalesce with their neighbours and are handed out again first-fit, but only after
//! `QUARANTINE`: a packet that read a group's place just before it changed may still be reading
//! the old slots (an XDP run lasts microseconds; the quarantine is far longer).
//!
//! After a restart the layout is read back from `LB_GROUPS` (`TableSpace::adopt`): the maps,
//! not a file, say which slots are in use.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};

/// How long a freed extent waits before it is handed out again.
pub const QUARANTINE: Duration = Duration::from_millis(100);

/// One half's place: first slot and how many slots it may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub base: u32,
    pub capacity: u32,
}

/// A group as `LB_GROUPS` shows it: id, active half, each half's (base, size).
pub type GroupLayout = (u32, usize, [(u32, u32); 2]);

/// Where a half goes (`TableSpace::place`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub base: u32,
    /// When the half moved: the extent it had before (None: it had none).
    pub moved_from: Option<Option<Extent>>,
}

/// Why a half could not be placed.
#[derive(Debug, PartialEq, Eq)]
pub enum NoRoom {
    /// Enough slots come free when the quarantine of recently freed extents ends.
    NotYet { free_at: Instant },
    /// The table budget is too small for the groups as configured.
    Exhausted { wanted: u32, free: u32, total: u32 },
}

#[derive(Debug, Default)]
pub struct TableSpace {
    total: u32,
    /// Free extents, base → length; never adjacent (coalesced).
    free: BTreeMap<u32, u32>,
    /// Freed extents not handed out yet: (usable from, extent).
    quarantined: VecDeque<(Instant, Extent)>,
    /// Each group's two halves.
    halves: BTreeMap<u32, [Option<Extent>; 2]>,
}

impl TableSpace {
    /// `total` slots, all free.
    pub fn new(total: u32) -> Self {
        let mut free = BTreeMap::new();
        if total > 0 {
            free.insert(0, total);
        }
        Self {
            total,
            free,
            ..Default::default()
        }
    }

    /// The layout the maps show: `groups` gives each group's active half and both halves as
    /// (base, size) from `LB_GROUPS`. Halves with a table keep exactly their slots, everything
    /// else is free. An inactive half that overlaps another table (a publish that failed half
    /// way) is dropped: nothing reads it, and the next publish places it afresh.
    pub fn adopt(total: u32, groups: impl IntoIterator<Item = GroupLayout>) -> Result<Self> {
        let mut space = Self::new(total);
        let groups: Vec<GroupLayout> = groups.into_iter().collect();
        for pass in [true, false] {
            for &(gid, active, halves) in &groups {
                for (half, &(base, size)) in halves.iter().enumerate() {
                    if size == 0 || (half == active & 1) != pass {
                        continue;
                    }
                    let extent = Extent {
                        base,
                        capacity: size,
                    };
                    if space.take(extent) {
                        space.halves.entry(gid).or_default()[half] = Some(extent);
                    } else if pass {
                        bail!(
                            "LB_GROUPS: the table of group {gid} (slots {base}..{}) overlaps another table or lies beyond LB_TABLES ({total} slots)",
                            base as u64 + size as u64
                        );
                    }
                }
            }
        }
        Ok(space)
    }

    /// Removes `e` from the free extents; false if any of its slots is not free.
    fn take(&mut self, e: Extent) -> bool {
        let end = e.base as u64 + e.capacity as u64;
        let Some((&fb, &fl)) = self.free.range(..=e.base).next_back() else {
            return false;
        };
        let fend = fb as u64 + fl as u64;
        if end > fend {
            return false;
        }
        self.free.remove(&fb);
        if fb < e.base {
            self.free.insert(fb, e.base - fb);
        }
        if end < fend {
            self.free.insert(end as u32, (fend - end) as u32);
        }
        true
    }

    fn give_back(&mut self, e: Extent) {
        if e.capacity == 0 {
            return;
        }
        let mut base = e.base;
        let mut len = e.capacity;
        if let Some((&pb, &pl)) = self.free.range(..base).next_back() {
            if pb + pl == base {
                self.free.remove(&pb);
                base = pb;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(base + len)) {
            self.free.remove(&(base + len));
            len += nl;
        }
        self.free.insert(base, len);
    }

    /// Ends the quarantine of extents freed at least `QUARANTINE` before `now`.
    fn reclaim(&mut self, now: Instant) {
        while let Some(&(at, e)) = self.quarantined.front() {
            if at > now {
                break;
            }
            self.quarantined.pop_front();
            self.give_back(e);
        }
    }

    fn quarantine(&mut self, e: Extent, now: Instant) {
        if e.capacity > 0 {
            self.quarantined.push_back((now + QUARANTINE, e));
        }
    }

    /// Where group `gid`'s `half` is to be written with a table of `size` slots: its own extent
    /// when big enough, else a new one. A move is settled by `settle` once `LB_GROUPS` points at
    /// the new extent (the old one is freed then), or undone by `undo` if that write failed.
    pub fn place(
        &mut self,
        gid: u32,
        half: usize,
        size: u32,
        now: Instant,
    ) -> Result<Placement, NoRoom> {
        self.reclaim(now);
        let current = self.halves.get(&gid).and_then(|h| h[half]);
        if let Some(e) = current {
            if e.capacity >= size {
                return Ok(Placement {
                    base: e.base,
                    moved_from: None,
                });
            }
        }
        if size == 0 {
            return Ok(Placement {
                base: 0,
                moved_from: None,
            });
        }
        let found = self
            .free
            .iter()
            .find(|(_, &len)| len >= size)
            .map(|(&base, _)| base);
        let Some(base) = found else {
            let free: u32 = self.free.values().sum();
            let waiting: u32 = self.quarantined.iter().map(|(_, e)| e.capacity).sum();
            return Err(match self.quarantined.back() {
                Some(&(at, _)) if free + waiting >= size => NoRoom::NotYet { free_at: at },
                _ => NoRoom::Exhausted {
                    wanted: size,
                    free,
                    total: self.total,
                },
            });
        };
        let extent = Extent {
            base,
            capacity: size,
        };
        let taken = self.take(extent);
        debug_assert!(taken, "a free extent was found");
        self.halves.entry(gid).or_default()[half] = Some(extent);
        Ok(Placement {
            base,
            moved_from: Some(current),
        })
    }

    /// `LB_GROUPS` points at the new extent: the one the half moved from is freed.
    pub fn settle(&mut self, p: Placement, now: Instant) {
        if let Some(Some(old)) = p.moved_from {
            self.quarantine(old, now);
        }
    }

    /// Writing `LB_GROUPS` failed: the half keeps its old extent, the new one is free again
    /// (nothing points at it).
    pub fn undo(&mut self, gid: u32, half: usize, p: Placement) {
        let Some(old) = p.moved_from else {
            return;
        };
        let new = self.halves.get_mut(&gid).and_then(|h| {
            let new = h[half].take();
            h[half] = old;
            new
        });
        if let Some(new) = new {
            self.give_back(new);
        }
    }

    /// Frees one half (its table is empty now; packets may still read it for a moment).
    pub fn free_half(&mut self, gid: u32, half: usize, now: Instant) {
        if let Some(e) = self.halves.get_mut(&gid).and_then(|h| h[half].take()) {
            self.quarantine(e, now);
        }
    }

    /// Gives back both halves of a group that no listener uses any more.
    pub fn release(&mut self, gid: u32, now: Instant) {
        if let Some(halves) = self.halves.remove(&gid) {
            for e in halves.into_iter().flatten() {
                self.quarantine(e, now);
            }
        }
    }

    /// The extent of a group's half, if it has one.
    pub fn extent(&self, gid: u32, half: usize) -> Option<Extent> {
        self.halves.get(&gid).and_then(|h| h[half])
    }

    /// Slots free now, not counting quarantined ones.
    pub fn free_slots(&self) -> u32 {
        self.free.values().sum()
    }

    pub fn total(&self) -> u32 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn later(t: Instant) -> Instant {
        t + QUARANTINE
    }

    fn base(p: Result<Placement, NoRoom>) -> Result<u32, NoRoom> {
        p.map(|p| p.base)
    }

    #[test]
    fn a_move_whose_group_write_failed_is_undone() {
        let t = Instant::now();
        let mut s = TableSpace::new(100);
        let first = s.place(1, 0, 30, t).unwrap();
        s.settle(first, t);
        let moved = s.place(1, 0, 50, t).unwrap();
        assert_eq!(moved.base, 30);
        s.undo(1, 0, moved);
        assert_eq!(
            s.extent(1, 0),
            Some(Extent {
                base: 0,
                capacity: 30
            })
        );
        assert_eq!(s.free_slots(), 70, "the new extent is free again at once");
    }

    #[test]
    fn a_table_that_grows_moves_and_its_old_slots_come_back() {
        let t = Instant::now();
        let mut s = TableSpace::new(100);
        assert_eq!(base(s.place(1, 0, 30, t)), Ok(0));
        assert_eq!(base(s.place(1, 1, 30, t)), Ok(30));
        // Same size or smaller: in place.
        assert_eq!(base(s.place(1, 0, 20, t)), Ok(0));
        // Bigger: a new extent; the old one is quarantined once settled, then free again.
        let moved = s.place(1, 0, 40, t).unwrap();
        assert_eq!(moved.base, 60);
        s.settle(moved, t);
        assert_eq!(s.free_slots(), 0);
        assert_eq!(
            base(s.place(2, 0, 30, t)),
            Err(NoRoom::NotYet { free_at: later(t) })
        );
        assert_eq!(base(s.place(2, 0, 30, later(t))), Ok(0));
    }

    #[test]
    fn released_groups_coalesce_and_are_reused_only_after_the_quarantine() {
        let t = Instant::now();
        let mut s = TableSpace::new(90);
        for gid in 0..3 {
            assert_eq!(base(s.place(gid, 0, 15, t)), Ok(gid * 30));
            assert_eq!(base(s.place(gid, 1, 15, t)), Ok(gid * 30 + 15));
        }
        s.release(0, t);
        s.release(1, t);
        assert!(matches!(s.place(3, 0, 60, t), Err(NoRoom::NotYet { .. })));
        // 0..30 and 30..60 merge into one extent of 60.
        assert_eq!(base(s.place(3, 0, 60, later(t))), Ok(0));
        assert_eq!(s.extent(0, 0), None);
        assert_eq!(
            base(s.place(4, 0, 1, later(t))),
            Err(NoRoom::Exhausted {
                wanted: 1,
                free: 0,
                total: 90
            })
        );
    }

    #[test]
    fn renaming_groups_forever_never_runs_out() {
        // A blue/green rename per step: the new group's halves, then the old group released.
        // Two groups live at a time, in 8 tables' worth of slots (the agent budgets 4 per
        // configured table, and at least 32 of the default size).
        let mut t = Instant::now();
        let mut s = TableSpace::new(8 * 97);
        for gid in 1..1000u32 {
            for half in 0..2 {
                let p = s
                    .place(gid, half, 89 + (gid % 3) * 4, t)
                    .unwrap_or_else(|e| panic!("group {gid}: {e:?}"));
                s.settle(p, t);
            }
            s.release(gid - 1, t);
            t += QUARANTINE;
        }
    }

    #[test]
    fn empty_tables_take_no_slots() {
        let t = Instant::now();
        let mut s = TableSpace::new(10);
        assert_eq!(base(s.place(7, 0, 0, t)), Ok(0));
        assert_eq!(s.free_slots(), 10);
    }

    #[test]
    fn adopting_reads_the_layout_back_and_refuses_overlaps() {
        let mut s = TableSpace::adopt(
            100,
            [(1, 0, [(0, 10), (50, 20)]), (2, 0, [(10, 5), (0, 0)])],
        )
        .expect("a layout without overlaps");
        assert_eq!(s.free_slots(), 65);
        assert_eq!(
            s.extent(1, 1),
            Some(Extent {
                base: 50,
                capacity: 20
            })
        );
        assert_eq!(base(s.place(3, 0, 35, Instant::now())), Ok(15));
        let err = TableSpace::adopt(100, [(1, 0, [(0, 10), (0, 0)]), (2, 0, [(5, 10), (0, 0)])])
            .expect_err("overlapping tables");
        assert!(err.to_string().contains("group 2"), "{err}");
        assert!(TableSpace::adopt(10, [(1, 0, [(5, 10), (0, 0)])]).is_err());
        // An inactive half over another group's table (its publish failed half way) is
        // dropped, whichever group comes first.
        for groups in [
            [(1, 0, [(0, 10), (20, 10)]), (2, 1, [(0, 0), (25, 10)])],
            [(2, 1, [(0, 0), (25, 10)]), (1, 0, [(0, 10), (20, 10)])],
        ] {
            let s = TableSpace::adopt(100, groups).expect("inactive overlap tolerated");
            assert_eq!(s.extent(1, 1), None);
            assert_eq!(
                s.extent(2, 1),
                Some(Extent {
                    base: 25,
                    capacity: 10
                })
            );
        }
    }
}
