//! A vector that grows a chunk at a time: a push never moves the items of a full chunk.
//!
//! A `Vec` of every bucket of a budget doubled in one push: the push that grew it copied all
//! of them into fresh memory, and a cluster follower folding 20,000 events/s stalled 10–60 ms
//! on it (perf: `RawVec::grow_one` under `BudgetState::insert`, most of it the kernel zeroing
//! the new pages; benches/README.md "Follower lag"). A chunk holds up to [`CHUNK`] items and
//! grows by doubling until full, so a push moves at most half a chunk (a clone's last chunk
//! doubles again from its length).

/// Items per chunk (a power of two).
const CHUNK: usize = 1024;
const SHIFT: u32 = CHUNK.trailing_zeros();

/// Items by index, in chunks of [`CHUNK`]; every chunk but the last is full.
#[derive(Debug, Clone)]
pub(crate) struct Chunked<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Chunked<T> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push(&mut self, item: T) {
        match self.chunks.last_mut() {
            Some(c) if c.len() < CHUNK => c.push(item),
            _ => {
                // Grown by doubling up to CHUNK (a budget of three buckets does not take room
                // for 1,024): a growth moves at most CHUNK / 2 items.
                self.chunks.push(vec![item]);
            }
        }
        self.len += 1;
    }

    pub(crate) fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i >> SHIFT)?.get(i & (CHUNK - 1))
    }

    pub(crate) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.chunks.get_mut(i >> SHIFT)?.get_mut(i & (CHUNK - 1))
    }

    /// Room for `additional` more items' chunk pointers (the chunks come as items do).
    pub(crate) fn reserve(&mut self, additional: usize) {
        self.chunks.reserve(additional.div_ceil(CHUNK));
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.chunks.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_keep_their_index_and_their_place_as_chunks_are_added() {
        let mut c = Chunked::default();
        for i in 0..CHUNK {
            c.push(i);
        }
        // The first chunk is full: later pushes never move what it holds.
        let first: *const usize = c.get(0).unwrap();
        let n = CHUNK * 3 + 5;
        for i in CHUNK..n {
            c.push(i);
        }
        assert!(
            std::ptr::eq(first, c.get(0).unwrap()),
            "no push moved an item of a full chunk"
        );
        assert_eq!(c.len(), n);
        assert!((0..n).all(|i| c.get(i) == Some(&i)));
        assert_eq!(c.get(n), None);
        assert!(c.iter().copied().eq(0..n));
        *c.get_mut(CHUNK + 1).unwrap() = 7;
        assert_eq!(c.get(CHUNK + 1), Some(&7));
        let mut d = c.clone();
        assert!(d.iter().eq(c.iter()));
        d.push(n);
        assert_eq!(d.get(n), Some(&n), "a clone grows on from its last chunk");
    }
}
