//! The KV block allocator: which sequence holds which block of the engine's paged KV pool,
//! and which full blocks are kept as a prefix cache.
//!
//! Every block is in exactly one of three states:
//!
//! - **free**: on the free list, holding nothing anyone wants;
//! - **held**: `refs > 0` block tables contain it. A full block of a shared prefix is held by
//!   every sequence that uses it;
//! - **cached**: nobody holds it, but it is a full block registered in the prefix cache, so a
//!   later request whose tokens start the same way can reuse it instead of recomputing it.
//!   Cached blocks count as available: when the free list is empty, the least recently
//!   released cached block is evicted (forgotten by the cache) and handed out.
//!
//! A cached block is keyed by the hash of (its parent block's key, its tokens), so a key
//! names a block's tokens *and everything before them*: two prompts share a cached block only
//! when they agree on every token up to its end. The map stores each block's parent key and
//! tokens too and compares them on lookup, so a 64-bit hash collision cannot hand a request
//! someone else's KV.
//!
//! Only full blocks are ever shared, and a sequence writes only at positions past the ones it
//! has computed, so a shared block is never written: no copy-on-write is needed.
//!
//! There is one way to give blocks back, [`BlockManager::free`], which takes the
//! [`BlockTable`] by value. `BlockTable` is not `Clone`, and its `Drop` asserts (in debug
//! builds) that it was emptied by `free`, so a table can be neither freed twice nor leaked
//! silently. Finishing, cancelling, failing and preempting a sequence all use that one path.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use gptj_engine::BlockId;

/// Key of a full block in the prefix cache: a hash of its parent's key and its tokens.
pub type BlockHash = u64;

/// The key of the (imaginary) parent of a sequence's first block, in the shared scope.
pub const ROOT_HASH: BlockHash = 0x6770_746a_5f72_6f6f;

/// The root key of a cache scope: sequences share cached blocks only when their scopes
/// (the salt: a tenant, a request's `cache_salt`) are equal. `None` is the shared scope.
pub fn scope_root(salt: Option<&str>) -> BlockHash {
    match salt {
        None => ROOT_HASH,
        Some(salt) => {
            let mut h = DefaultHasher::new();
            ROOT_HASH.hash(&mut h);
            salt.hash(&mut h);
            h.finish()
        }
    }
}

/// The key of a full block whose parent has key `parent`.
pub fn block_hash(parent: BlockHash, tokens: &[u32]) -> BlockHash {
    // SipHash with fixed keys: the same tokens give the same key for the life of the process.
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The blocks of one sequence, in position order. Not `Clone`: it is given back by value to
/// [`BlockManager::free`], exactly once.
#[derive(Debug)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    /// Prefix-cache keys of the leading full blocks whose tokens are computed, in order.
    hashes: Vec<BlockHash>,
    /// The parent key of the first block: the sequence's cache scope ([`scope_root`]).
    root: BlockHash,
}

impl Default for BlockTable {
    fn default() -> Self {
        Self::in_scope(ROOT_HASH)
    }
}

impl BlockTable {
    /// An empty table whose blocks are cached under `root`.
    pub fn in_scope(root: BlockHash) -> Self {
        Self {
            blocks: Vec::new(),
            hashes: Vec::new(),
            root,
        }
    }

    /// The block ids, position order: position `p` lives in `blocks()[p / block_size]`.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Number of blocks held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.blocks.len()
    }
}

impl Drop for BlockTable {
    fn drop(&mut self) {
        debug_assert!(
            self.blocks.is_empty() || std::thread::panicking(),
            "a BlockTable holding {} blocks was dropped without BlockManager::free: blocks leaked",
            self.blocks.len()
        );
    }
}

/// Not enough free or evictable blocks for a request; nothing was allocated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("out of KV blocks: {wanted} wanted, {available} available")]
pub struct OutOfBlocks {
    /// Blocks asked for.
    pub wanted: usize,
    /// Blocks that were free or evictable.
    pub available: usize,
}

/// What the prefix cache knows about one registered block.
#[derive(Debug, Clone)]
struct CacheEntry {
    hash: BlockHash,
    parent: BlockHash,
    tokens: Box<[u32]>,
}

/// Per-block bookkeeping.
#[derive(Debug, Clone, Default)]
struct BlockMeta {
    /// Number of block tables holding this block.
    refs: u32,
    /// Set while the block is registered in the prefix cache.
    cached: Option<CacheEntry>,
    /// When `refs == 0 && cached.is_some()`: its key in `evictable`.
    lru_tick: u64,
}

/// Usage figures of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockUsage {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks held by at least one sequence.
    pub used: usize,
    /// Unheld blocks kept for the prefix cache (available, evicted on demand).
    pub cached: usize,
    /// Blocks on the free list.
    pub free: usize,
}

impl BlockUsage {
    /// Blocks that can be handed out now: free plus evictable.
    #[cfg(test)]
    pub fn available(&self) -> usize {
        self.free + self.cached
    }
}

/// Owns the state of every block of the pool. Plain data, owned by the engine loop: no lock.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    meta: Vec<BlockMeta>,
    /// Blocks with no holder and no cache entry. Popped from the end.
    free: Vec<BlockId>,
    /// Unheld cached blocks, least recently released first.
    evictable: BTreeMap<u64, BlockId>,
    /// Prefix cache: key -> block.
    by_hash: HashMap<BlockHash, BlockId>,
    prefix_caching: bool,
    tick: u64,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` tokens, all free.
    pub fn new(num_blocks: usize, block_size: usize, prefix_caching: bool) -> Self {
        Self {
            block_size: block_size.max(1),
            meta: vec![BlockMeta::default(); num_blocks],
            // Reversed so that block 0 is handed out first (easier to read in logs and tests).
            free: (0..num_blocks as u32).rev().map(BlockId).collect(),
            evictable: BTreeMap::new(),
            by_hash: HashMap::new(),
            prefix_caching,
            tick: 0,
        }
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks needed to hold `tokens` token slots.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Current usage.
    pub fn usage(&self) -> BlockUsage {
        let total = self.meta.len();
        let free = self.free.len();
        let cached = self.evictable.len();
        BlockUsage {
            total,
            used: total - free - cached,
            cached,
            free,
        }
    }

    /// Blocks that can be handed out now (free or evictable).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Appends `n` blocks to `table`, evicting least recently used cached blocks when the
    /// free list runs dry. All or nothing: on error `table` is unchanged.
    pub fn allocate(&mut self, table: &mut BlockTable, n: usize) -> Result<(), OutOfBlocks> {
        let available = self.available();
        if n > available {
            return Err(OutOfBlocks {
                wanted: n,
                available,
            });
        }
        table.blocks.reserve(n);
        for _ in 0..n {
            let id = match self.free.pop() {
                Some(id) => id,
                None => match self.evictable.pop_first() {
                    Some((_, id)) => {
                        self.forget(id);
                        id
                    }
                    // Unreachable: `available` counted both lists above.
                    None => {
                        return Err(OutOfBlocks {
                            wanted: n,
                            available,
                        })
                    }
                },
            };
            self.meta[id.0 as usize].refs = 1;
            table.blocks.push(id);
        }
        Ok(())
    }

    /// Grows `table` so it covers `tokens` token slots.
    pub fn ensure_capacity(
        &mut self,
        table: &mut BlockTable,
        tokens: usize,
    ) -> Result<(), OutOfBlocks> {
        let need = self.blocks_for(tokens).saturating_sub(table.blocks.len());
        self.allocate(table, need)
    }

    /// Blocks `ensure_capacity(table, tokens)` would take.
    pub fn blocks_missing(&self, table: &BlockTable, tokens: usize) -> usize {
        self.blocks_for(tokens).saturating_sub(table.blocks.len())
    }

    /// A new table in the cache scope `root` holding the cached blocks of the longest cached
    /// prefix of `tokens` in that scope, and the number of tokens they cover. At most
    /// `max_tokens` tokens are reused (a request must compute at least its last token to get
    /// logits). Empty when prefix caching is off.
    pub fn lookup_prefix(
        &mut self,
        tokens: &[u32],
        max_tokens: usize,
        root: BlockHash,
    ) -> (BlockTable, usize) {
        let mut table = BlockTable::in_scope(root);
        if !self.prefix_caching {
            return (table, 0);
        }
        let bs = self.block_size;
        let mut parent = root;
        for chunk in tokens[..max_tokens.min(tokens.len())].chunks_exact(bs) {
            let hash = block_hash(parent, chunk);
            let Some(&id) = self.by_hash.get(&hash) else {
                break;
            };
            let meta = &self.meta[id.0 as usize];
            let matches = meta
                .cached
                .as_ref()
                .is_some_and(|e| e.parent == parent && *e.tokens == *chunk);
            if !matches {
                break;
            }
            self.acquire(id);
            table.blocks.push(id);
            table.hashes.push(hash);
            parent = hash;
        }
        let hit = table.blocks.len() * bs;
        (table, hit)
    }

    /// Registers in the prefix cache the full blocks of `table` whose tokens are now computed
    /// (`tokens[..computed]`). Blocks whose content is already cached elsewhere stay
    /// unregistered (they return to the free list when released).
    pub fn register_computed(&mut self, table: &mut BlockTable, tokens: &[u32], computed: usize) {
        if !self.prefix_caching {
            return;
        }
        let bs = self.block_size;
        let full = (computed.min(tokens.len()) / bs).min(table.blocks.len());
        while table.hashes.len() < full {
            let i = table.hashes.len();
            let parent = table.hashes.last().copied().unwrap_or(table.root);
            let chunk = &tokens[i * bs..(i + 1) * bs];
            let hash = block_hash(parent, chunk);
            let id = table.blocks[i];
            let meta = &mut self.meta[id.0 as usize];
            if meta.cached.is_none() && !self.by_hash.contains_key(&hash) {
                meta.cached = Some(CacheEntry {
                    hash,
                    parent,
                    tokens: chunk.into(),
                });
                self.by_hash.insert(hash, id);
            }
            table.hashes.push(hash);
        }
    }

    /// Gives back every block of `table`: each loses one holder; a block nobody holds any
    /// more becomes cached (if registered) or free. The one way blocks come back.
    pub fn free(&mut self, mut table: BlockTable) {
        let blocks = std::mem::take(&mut table.blocks);
        table.hashes.clear();
        // Last block first: its tick is the oldest, so a sequence's tail is evicted before
        // its head, which is the part other prompts are likely to share.
        for id in blocks.into_iter().rev() {
            let meta = &mut self.meta[id.0 as usize];
            debug_assert!(meta.refs > 0, "block {} freed while not held", id.0);
            meta.refs = meta.refs.saturating_sub(1);
            if meta.refs == 0 {
                if meta.cached.is_some() {
                    self.tick += 1;
                    meta.lru_tick = self.tick;
                    self.evictable.insert(self.tick, id);
                } else {
                    self.free.push(id);
                }
            }
        }
    }

    /// One more holder for a cached block (taking it off the eviction list if it was unheld).
    fn acquire(&mut self, id: BlockId) {
        let meta = &mut self.meta[id.0 as usize];
        if meta.refs == 0 {
            self.evictable.remove(&meta.lru_tick);
        }
        meta.refs += 1;
    }

    /// Drops a block's prefix-cache entry (it is being evicted for reuse).
    fn forget(&mut self, id: BlockId) {
        if let Some(entry) = self.meta[id.0 as usize].cached.take() {
            if self.by_hash.get(&entry.hash) == Some(&id) {
                self.by_hash.remove(&entry.hash);
            }
        }
    }

    /// Number of block tables holding block `id` (for tests and assertions).
    #[cfg(test)]
    pub fn refs(&self, id: BlockId) -> u32 {
        self.meta.get(id.0 as usize).map_or(0, |m| m.refs)
    }

    /// Checks the allocator's internal invariants; returns a description of the first one
    /// broken. `holders[b]` is the number of live tables containing block `b` (computed by the
    /// caller from the tables it knows), or `None` to skip that comparison.
    #[cfg(test)]
    pub fn check(&self, holders: Option<&[u32]>) -> Result<(), String> {
        let n = self.meta.len();
        let mut on_free = vec![false; n];
        for id in &self.free {
            let i = id.0 as usize;
            if i >= n || on_free[i] {
                return Err(format!("block {i} twice on the free list or out of range"));
            }
            on_free[i] = true;
        }
        let mut on_lru = vec![false; n];
        for (&tick, id) in &self.evictable {
            let i = id.0 as usize;
            if i >= n || on_lru[i] || on_free[i] {
                return Err(format!("block {i} on the eviction list twice or also free"));
            }
            if self.meta[i].lru_tick != tick {
                return Err(format!("block {i} has a stale eviction tick"));
            }
            on_lru[i] = true;
        }
        for (i, m) in self.meta.iter().enumerate() {
            let state_ok = match (m.refs, m.cached.is_some()) {
                (0, false) => on_free[i],
                (0, true) => on_lru[i],
                (_, _) => !on_free[i] && !on_lru[i],
            };
            if !state_ok {
                return Err(format!(
                    "block {i}: refs {}, cached {}, on free list {}, evictable {}",
                    m.refs,
                    m.cached.is_some(),
                    on_free[i],
                    on_lru[i]
                ));
            }
            if let Some(h) = holders {
                if h.get(i).copied().unwrap_or(0) != m.refs {
                    return Err(format!(
                        "block {i}: refs {} but {} live holders",
                        m.refs, h[i]
                    ));
                }
            }
            if let Some(e) = &m.cached {
                if self.by_hash.get(&e.hash) != Some(&BlockId(i as u32)) {
                    return Err(format!(
                        "block {i} is cached but the map does not point to it"
                    ));
                }
            }
        }
        for (hash, id) in &self.by_hash {
            let e = self.meta.get(id.0 as usize).and_then(|m| m.cached.as_ref());
            if e.map(|e| e.hash) != Some(*hash) {
                return Err(format!(
                    "map entry {hash:x} points to block {} without that key",
                    id.0
                ));
            }
        }
        let u = self.usage();
        if u.used + u.cached + u.free != u.total {
            return Err(format!("counts do not add up: {u:?}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(t: &BlockTable) -> Vec<u32> {
        t.blocks().iter().map(|b| b.0).collect()
    }

    #[test]
    fn allocate_and_free_round_trip() {
        let mut m = BlockManager::new(4, 2, false);
        let mut t = BlockTable::default();
        m.allocate(&mut t, 3).unwrap();
        assert_eq!(ids(&t), vec![0, 1, 2]);
        assert_eq!(
            m.usage(),
            BlockUsage {
                total: 4,
                used: 3,
                cached: 0,
                free: 1
            }
        );
        let err = m.allocate(&mut t, 2).unwrap_err();
        assert_eq!(
            err,
            OutOfBlocks {
                wanted: 2,
                available: 1
            }
        );
        assert_eq!(t.len(), 3, "a failed allocation leaves the table unchanged");
        m.free(t);
        assert_eq!(m.usage().free, 4);
        m.check(None).unwrap();
    }

    #[test]
    fn ensure_capacity_rounds_up_to_blocks() {
        let mut m = BlockManager::new(8, 4, false);
        let mut t = BlockTable::default();
        m.ensure_capacity(&mut t, 5).unwrap();
        assert_eq!(t.len(), 2);
        m.ensure_capacity(&mut t, 8).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(m.blocks_missing(&t, 9), 1);
        m.ensure_capacity(&mut t, 9).unwrap();
        assert_eq!(t.len(), 3);
        m.free(t);
    }

    #[test]
    fn prefix_cache_reuses_full_blocks_of_the_same_prefix() {
        let mut m = BlockManager::new(8, 2, true);
        let prompt = [1, 2, 3, 4, 5];
        let mut a = BlockTable::default();
        m.ensure_capacity(&mut a, 5).unwrap();
        m.register_computed(&mut a, &prompt, 5);
        // Two full blocks registered; the partial third is not.
        assert_eq!(a.hashes.len(), 2);
        // Same prompt while `a` still runs: shares both full blocks.
        let (b, hit) = m.lookup_prefix(&prompt, 4, ROOT_HASH);
        assert_eq!((ids(&b), hit), (vec![ids(&a)[0], ids(&a)[1]], 4));
        assert_eq!(m.refs(a.blocks()[0]), 2);
        // A prompt that differs in the second block shares only the first.
        let (c, hit) = m.lookup_prefix(&[1, 2, 9, 4, 5], 4, ROOT_HASH);
        assert_eq!(hit, 2);
        // The cap leaves at least one token to compute.
        let (d, hit) = m.lookup_prefix(&prompt[..4], 3, ROOT_HASH);
        assert_eq!(hit, 2);
        for t in [a, b, c, d] {
            m.free(t);
        }
        // Both registered blocks are now cached (evictable), the third free.
        assert_eq!(
            m.usage(),
            BlockUsage {
                total: 8,
                used: 0,
                cached: 2,
                free: 6
            }
        );
        let (e, hit) = m.lookup_prefix(&prompt, 4, ROOT_HASH);
        assert_eq!(hit, 4);
        assert_eq!(m.usage().cached, 0);
        m.free(e);
        m.check(None).unwrap();
    }

    #[test]
    fn a_block_is_keyed_by_everything_before_it() {
        let mut m = BlockManager::new(8, 2, true);
        let mut a = BlockTable::default();
        m.ensure_capacity(&mut a, 4).unwrap();
        m.register_computed(&mut a, &[1, 2, 3, 4], 4);
        m.free(a);
        // Same second block [3, 4] after a different first block: no hit at all.
        let (t, hit) = m.lookup_prefix(&[9, 9, 3, 4, 5], 4, ROOT_HASH);
        assert_eq!(hit, 0);
        m.free(t);
    }

    #[test]
    fn cached_blocks_are_evicted_least_recently_released_first() {
        let mut m = BlockManager::new(3, 1, true);
        let mut a = BlockTable::default();
        m.ensure_capacity(&mut a, 3).unwrap();
        m.register_computed(&mut a, &[10, 11, 12], 3);
        m.free(a);
        assert_eq!(m.usage().cached, 3);
        // Released tail first, so the tail (block 2) is evicted first and the head survives.
        let mut t = BlockTable::default();
        m.allocate(&mut t, 1).unwrap();
        assert_eq!(ids(&t), vec![2]);
        let (hit_table, hit) = m.lookup_prefix(&[10, 11, 12, 13], 3, ROOT_HASH);
        assert_eq!(hit, 2);
        m.free(hit_table);
        m.free(t);
        m.check(None).unwrap();
    }

    #[test]
    fn duplicate_content_is_registered_once() {
        let mut m = BlockManager::new(4, 2, true);
        let (mut a, mut b) = (BlockTable::default(), BlockTable::default());
        m.ensure_capacity(&mut a, 2).unwrap();
        m.ensure_capacity(&mut b, 2).unwrap();
        m.register_computed(&mut a, &[7, 8], 2);
        m.register_computed(&mut b, &[7, 8], 2);
        m.free(a);
        m.free(b);
        assert_eq!(
            m.usage(),
            BlockUsage {
                total: 4,
                used: 0,
                cached: 1,
                free: 3
            }
        );
        m.check(None).unwrap();
    }

    #[test]
    fn scopes_do_not_share_blocks() {
        let mut m = BlockManager::new(8, 2, true);
        let a_root = scope_root(Some("tenant-a"));
        let (mut a, _) = m.lookup_prefix(&[1, 2, 3, 4], 3, a_root);
        m.allocate(&mut a, 2).unwrap();
        m.register_computed(&mut a, &[1, 2, 3, 4], 4);
        let (b, hit) = m.lookup_prefix(&[1, 2, 3, 4, 5], 4, scope_root(Some("tenant-b")));
        assert_eq!(hit, 0, "another scope must not see tenant a's blocks");
        let (shared, hit) = m.lookup_prefix(&[1, 2, 3, 4, 5], 4, ROOT_HASH);
        assert_eq!(hit, 0, "nor the shared scope");
        let (same, hit) = m.lookup_prefix(&[1, 2, 3, 4, 5], 4, a_root);
        assert_eq!(hit, 4, "the same scope does");
        for t in [a, b, shared, same] {
            m.free(t);
        }
        m.check(None).unwrap();
    }

    #[test]
    fn prefix_caching_off_never_hits() {
        let mut m = BlockManager::new(4, 2, false);
        let mut a = BlockTable::default();
        m.ensure_capacity(&mut a, 4).unwrap();
        m.register_computed(&mut a, &[1, 2, 3, 4], 4);
        m.free(a);
        assert_eq!(m.usage().free, 4);
        let (t, hit) = m.lookup_prefix(&[1, 2, 3, 4, 5], 4, ROOT_HASH);
        assert_eq!(hit, 0);
        m.free(t);
    }
}
