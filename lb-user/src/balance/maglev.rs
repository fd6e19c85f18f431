//! Consistent hashing for `client-id` and `source`: the Maglev lookup table and the
//! stable hash it and the keys use.

/// Size of a Maglev lookup table: a prime well above 100 x the servers of a cluster,
/// so the slots of each server are within 1% of its weighted share.
pub const MAGLEV_SIZE: usize = 65_537;

/// A Maglev lookup table (Eisenbud et al., NSDI 2016) over some servers of a pool.
///
/// Each server has a permutation of the slots, derived from the hash of its name; the
/// servers take turns claiming the next free slot of their permutation, a server of
/// weight w taking w turns for every turn of the lightest. The result depends only on
/// the names and weights, so every mqttlb instance with the same server list builds
/// the same table, and removing a server leaves almost every slot of the others as it
/// was.
#[derive(Debug)]
pub struct Maglev {
    /// Server index (in the pool) per slot; empty when the tier has no server.
    pub(super) table: Vec<u32>,
}

impl Maglev {
    /// Builds the table over `servers` (pool index, name, weight).
    pub fn new(servers: &[(usize, &str, u32)]) -> Self {
        if servers.is_empty() {
            return Self { table: Vec::new() };
        }
        let m = MAGLEV_SIZE as u64;
        let perm: Vec<(u64, u64)> = servers
            .iter()
            .map(|(_, name, _)| {
                let offset = hash_bytes(name.as_bytes(), 0x6d61_676c) % m;
                let skip = hash_bytes(name.as_bytes(), 0x736b_6970) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let max_weight = servers.iter().map(|s| u64::from(s.2)).max().unwrap_or(1);
        let mut next = vec![0u64; servers.len()];
        let mut credit = vec![0u64; servers.len()];
        let mut table = vec![u32::MAX; MAGLEV_SIZE];
        let mut filled = 0;
        while filled < MAGLEV_SIZE {
            for (i, &(index, _, weight)) in servers.iter().enumerate() {
                credit[i] += u64::from(weight);
                while credit[i] >= max_weight && filled < MAGLEV_SIZE {
                    credit[i] -= max_weight;
                    let (offset, skip) = perm[i];
                    loop {
                        let slot = ((offset + next[i] * skip) % m) as usize;
                        next[i] += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = index as u32;
                            filled += 1;
                            break;
                        }
                    }
                }
            }
        }
        Self { table }
    }

    /// The server for `hash`: the one in its slot, or walking forward, the first for
    /// which `usable` holds.
    pub fn lookup(&self, hash: u64, usable: impl Fn(usize) -> bool) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let start = (hash % self.table.len() as u64) as usize;
        let mut last = u32::MAX;
        for step in 0..self.table.len() {
            let index = self.table[(start + step) % self.table.len()];
            // Runs of one server are common; test each server once per run.
            if index != last {
                if usable(index as usize) {
                    return Some(index as usize);
                }
                last = index;
            }
        }
        None
    }

    /// The server owning `hash`'s slot, usable or not.
    #[cfg(test)]
    pub(super) fn owner(&self, hash: u64) -> Option<usize> {
        self.lookup(hash, |_| true)
    }
}

/// A stable 64-bit hash (FNV-1a, then the SplitMix64 finalizer for avalanche). Stable
/// across builds and machines, unlike `std`'s hasher: consistent hashing relies on it.
pub fn hash_bytes(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
