//! Compile-time hash tables of lower-case words, looked up case-insensitively in place.

/// An open-addressing table built in a `const` context; `SLOTS` is a power of two kept at least
/// four times the number of words, so a lookup is one hash and usually one comparison.
pub(super) struct WordTable<V: Copy + 'static, const SLOTS: usize> {
    slots: [Option<(&'static [u8], V)>; SLOTS],
}

/// A hash of the length and of the first, middle and last bytes (ASCII-lowercased): four loads
/// and one multiply whatever the length. Collisions only cost a probe.
const fn hash(word: &[u8], slots: usize) -> usize {
    let len = word.len();
    if len == 0 {
        return 0;
    }
    let first = word[0].to_ascii_lowercase() as u32;
    let middle = word[len / 2].to_ascii_lowercase() as u32;
    let last = word[len - 1].to_ascii_lowercase() as u32;
    let key = (len as u32) << 24 | first << 16 | middle << 8 | last;
    // Fibonacci hashing: the top bits of one multiply by 2^32 / phi.
    (key.wrapping_mul(0x9e37_79b9) >> (32 - slots.trailing_zeros())) as usize
}

impl<V: Copy + 'static, const SLOTS: usize> WordTable<V, SLOTS> {
    /// A table without words.
    pub(super) const fn empty() -> Self {
        assert!(SLOTS.is_power_of_two());
        WordTable {
            slots: [None; SLOTS],
        }
    }

    /// Adds each `(word, value)`; the words must be lower case and distinct.
    pub(super) const fn with_pairs(mut self, pairs: &[(&'static [u8], V)]) -> Self {
        let mut i = 0;
        while i < pairs.len() {
            self = self.insert(pairs[i].0, pairs[i].1);
            i += 1;
        }
        self
    }

    /// Adds every word with the same value.
    pub(super) const fn with_words(mut self, words: &[&'static [u8]], value: V) -> Self {
        let mut i = 0;
        while i < words.len() {
            self = self.insert(words[i], value);
            i += 1;
        }
        self
    }

    const fn insert(mut self, word: &'static [u8], value: V) -> Self {
        let mut slot = hash(word, SLOTS);
        let mut probes = 0;
        while self.slots[slot].is_some() {
            slot = (slot + 1) & (SLOTS - 1);
            probes += 1;
            // Fails the build, not a lookup, if the table is too full.
            assert!(probes < SLOTS / 4, "word table too full");
        }
        self.slots[slot] = Some((word, value));
        self
    }

    /// The value of `word`, ignoring ASCII case.
    pub(super) fn get(&self, word: &[u8]) -> Option<V> {
        let mut slot = hash(word, SLOTS);
        // Never full (see `insert`), so the probe meets an empty slot.
        while let Some((candidate, value)) = self.slots[slot & (SLOTS - 1)] {
            if candidate.eq_ignore_ascii_case(word) {
                return Some(value);
            }
            slot = (slot + 1) & (SLOTS - 1);
        }
        None
    }

    /// The value of `word`, compared exactly (for quoted identifiers).
    pub(super) fn get_exact(&self, word: &[u8]) -> Option<V> {
        let mut slot = hash(word, SLOTS);
        while let Some((candidate, value)) = self.slots[slot & (SLOTS - 1)] {
            if candidate == word {
                return Some(value);
            }
            slot = (slot + 1) & (SLOTS - 1);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static TABLE: WordTable<u8, 16> = WordTable::empty()
        .with_pairs(&[(b"select", 1), (b"from", 2)])
        .with_words(&[b"a", b"bb"], 3);

    #[test]
    fn finds_words_ignoring_case_only_when_asked() {
        assert_eq!(TABLE.get(b"SELECT"), Some(1));
        assert_eq!(TABLE.get(b"From"), Some(2));
        assert_eq!(TABLE.get(b"bb"), Some(3));
        assert_eq!(TABLE.get(b""), None);
        assert_eq!(TABLE.get(b"selec"), None);
        assert_eq!(TABLE.get_exact(b"SELECT"), None);
        assert_eq!(TABLE.get_exact(b"select"), Some(1));
    }
}
