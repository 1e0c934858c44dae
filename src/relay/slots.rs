//! A slab that grows a page at a time: the flow table's storage.
//!
//! `slab::Slab` is one `Vec`, so it doubles: at 100 000 flows it holds room for 131 072, and
//! each doubling copies every flow while the worker waits (tens of MiB at that size). Here
//! the slots live in fixed pages of [`PAGE`]: growth allocates one page and moves nothing, at
//! most one page stands empty beyond the free slots, and a slot's address never changes.
//!
//! Each slot carries a generation, bumped when it is freed, so a key of a removed value (a
//! stale flow ID) finds nothing, even after the slot holds another value.

/// Slots per page.
pub const PAGE: usize = 1024;

const NONE: u32 = u32::MAX;

#[derive(Debug)]
enum Slot<T> {
    /// Free; the next free slot (or `NONE`).
    Vacant {
        gen: u32,
        next: u32,
    },
    Occupied {
        gen: u32,
        value: T,
    },
}

/// Bytes a value of type `T` takes in its slot (with the generation and the tag).
pub const fn slot_size<T>() -> usize {
    std::mem::size_of::<Slot<T>>()
}

/// A paged, generational slab.
#[derive(Debug)]
pub struct Slots<T> {
    pages: Vec<Box<[Slot<T>]>>,
    /// Head of the free list (or `NONE`).
    free: u32,
    len: usize,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Slots<T> {
    pub const fn new() -> Self {
        Slots {
            pages: Vec::new(),
            free: NONE,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots allocated (occupied or free).
    pub fn capacity(&self) -> usize {
        self.pages.len() * PAGE
    }

    fn slot(&self, idx: u32) -> Option<&Slot<T>> {
        self.pages
            .get(idx as usize / PAGE)
            .map(|p| &p[idx as usize % PAGE])
    }

    fn slot_mut(&mut self, idx: u32) -> Option<&mut Slot<T>> {
        self.pages
            .get_mut(idx as usize / PAGE)
            .map(|p| &mut p[idx as usize % PAGE])
    }

    /// Stores `value`; returns its index and generation.
    pub fn insert(&mut self, value: T) -> (u32, u32) {
        if self.free == NONE {
            let base = (self.pages.len() * PAGE) as u32;
            assert!(
                base < NONE - PAGE as u32,
                "more slots than a u32 index can name"
            );
            // The page's slots are chained in order, ending at the old (empty) free list.
            let page: Box<[Slot<T>]> = (0..PAGE as u32)
                .map(|i| Slot::Vacant {
                    gen: 0,
                    next: if i + 1 < PAGE as u32 {
                        base + i + 1
                    } else {
                        NONE
                    },
                })
                .collect();
            self.pages.push(page);
            self.free = base;
        }
        let idx = self.free;
        let slot = self.slot_mut(idx).expect("the free list names a slot");
        let (gen, next) = match *slot {
            Slot::Vacant { gen, next } => (gen, next),
            Slot::Occupied { .. } => unreachable!("the free list names an occupied slot"),
        };
        *slot = Slot::Occupied { gen, value };
        self.free = next;
        self.len += 1;
        (idx, gen)
    }

    pub fn get(&self, idx: u32, gen: u32) -> Option<&T> {
        match self.slot(idx)? {
            Slot::Occupied { gen: g, value } if *g == gen => Some(value),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, idx: u32, gen: u32) -> Option<&mut T> {
        match self.slot_mut(idx)? {
            Slot::Occupied { gen: g, value } if *g == gen => Some(value),
            _ => None,
        }
    }

    /// The value in slot `idx` whatever its generation, with that generation.
    pub fn get_any_mut(&mut self, idx: u32) -> Option<(u32, &mut T)> {
        match self.slot_mut(idx)? {
            Slot::Occupied { gen, value } => Some((*gen, value)),
            Slot::Vacant { .. } => None,
        }
    }

    /// Takes the value out; the slot's next value gets the next generation.
    pub fn remove(&mut self, idx: u32, gen: u32) -> Option<T> {
        let free = self.free;
        let slot = self.slot_mut(idx)?;
        if !matches!(slot, Slot::Occupied { gen: g, .. } if *g == gen) {
            return None;
        }
        let old = std::mem::replace(
            slot,
            Slot::Vacant {
                gen: gen.wrapping_add(1),
                next: free,
            },
        );
        self.free = idx;
        self.len -= 1;
        match old {
            Slot::Occupied { value, .. } => Some(value),
            Slot::Vacant { .. } => unreachable!("checked above"),
        }
    }

    /// Every value with its index and generation.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u32, &T)> {
        self.pages.iter().enumerate().flat_map(|(p, page)| {
            page.iter().enumerate().filter_map(move |(i, s)| match s {
                Slot::Occupied { gen, value } => Some(((p * PAGE + i) as u32, *gen, value)),
                Slot::Vacant { .. } => None,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_a_page_at_a_time_and_reuses_freed_slots() {
        let mut s = Slots::new();
        let keys: Vec<(u32, u32)> = (0..PAGE as u64 + 1).map(|v| s.insert(v)).collect();
        assert_eq!(s.len(), PAGE + 1);
        assert_eq!(
            s.capacity(),
            2 * PAGE,
            "one page beyond the first, not a doubling"
        );
        for (v, &(i, g)) in keys.iter().enumerate() {
            assert_eq!(s.get(i, g), Some(&(v as u64)));
        }
        let (i, g) = keys[7];
        assert_eq!(s.remove(i, g), Some(7));
        assert_eq!(s.remove(i, g), None, "removed once");
        assert_eq!(s.get(i, g), None);
        // The freed slot is used next, under a new generation: the old key finds nothing.
        let (i2, g2) = s.insert(70);
        assert_eq!(i2, i);
        assert_ne!(g2, g);
        assert_eq!(s.get(i, g), None);
        assert_eq!(s.get_mut(i2, g2), Some(&mut 70));
        assert_eq!(s.get_any_mut(i2), Some((g2, &mut 70)));
        assert_eq!(s.capacity(), 2 * PAGE);
        assert_eq!(s.iter().count(), PAGE + 1);
        assert!(s.iter().all(|(i, g, v)| s.get(i, g) == Some(v)));
    }

    #[test]
    fn churn_stays_within_the_pages_it_needs() {
        let mut s = Slots::new();
        let mut live = std::collections::VecDeque::new();
        for v in 0..100_000u32 {
            live.push_back(s.insert(v));
            if live.len() > 3000 {
                let (i, g) = live.pop_front().unwrap();
                assert!(s.remove(i, g).is_some());
            }
        }
        assert_eq!(s.len(), 3000);
        assert_eq!(s.capacity(), 3 * PAGE, "the 3 pages 3000 values need");
        assert_eq!(
            s.get(u32::MAX, 0),
            None,
            "an index past the pages finds nothing"
        );
    }
}
