//! The fast paths' view of their text, sixteen bytes at a time: which bytes belong to words,
//! which the fast paths pass without a look, and which start a word they must read (see
//! [`Marks`]). On x86_64, SSE2 (part of its baseline) classifies sixteen bytes in a few dozen
//! instructions, where a byte-by-byte loop spent about eight per byte of a word; elsewhere a
//! table answers byte by byte.

/// A byte of a word: ASCII letters, digits, `_` and `$` (`scan.l`'s ident_cont, ASCII only).
const WORD: u8 = 1;
/// Whitespace.
const SPACE: u8 = 2;
/// Single-byte operators and punctuation that start nothing longer: `= < > , . *`.
const PUNCT: u8 = 4;
/// A byte that, starting a word, makes the fast paths read the word: a digit or `$` (a number
/// or a parameter must be digits only) and the letters `d` to `m` and `u` in either case (the
/// words that block the SELECT fast path start with `d`, `f`, `i`, `m` or `u`).
const NOTABLE: u8 = 8;

const fn build_classes() -> [u8; 256] {
    let mut classes = [0u8; 256];
    let mut b = 0;
    while b < 128 {
        let byte = b as u8;
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'$' {
            classes[b] = WORD;
        }
        let folded = byte | 0x20;
        if byte.is_ascii_digit()
            || byte == b'$'
            || byte.is_ascii_alphabetic() && (folded >= b'd' && folded <= b'm' || folded == b'u')
        {
            classes[b] |= NOTABLE;
        }
        if matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c) {
            classes[b] = SPACE;
        }
        if matches!(byte, b'=' | b'<' | b'>' | b',' | b'.' | b'*') {
            classes[b] = PUNCT;
        }
        b += 1;
    }
    classes
}

/// Each byte's classes: [`WORD`], [`SPACE`] or [`PUNCT`], and [`NOTABLE`]; 0 for anything
/// else (non-ASCII bytes among them).
static CLASSES: [u8; 256] = build_classes();

/// Whether `b` is a byte of a word.
pub(super) fn is_word(b: u8) -> bool {
    CLASSES[usize::from(b)] & WORD != 0
}

/// Where the word that starts at `from` in `text` ends.
pub(super) fn word_end(text: &[u8], from: usize) -> usize {
    text[from..]
        .iter()
        .position(|&b| !is_word(b))
        .map_or(text.len(), |len| from + len)
}

/// Sixteen bytes' classes, bit `i` for byte `i`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Block {
    /// Bytes of a word.
    word: u16,
    /// Bytes the fast paths pass without a look: word bytes, whitespace and `= < > , . *`.
    quiet: u16,
    /// Notable bytes (see [`NOTABLE`]).
    notable: u16,
}

/// [`Block`] by table, a byte at a time.
#[cfg(any(test, not(target_arch = "x86_64")))]
fn classify_block_by_table(bytes: &[u8; 16]) -> Block {
    let mut block = Block {
        word: 0,
        quiet: 0,
        notable: 0,
    };
    for (i, &b) in bytes.iter().enumerate() {
        let class = CLASSES[usize::from(b)];
        block.word |= u16::from(class & WORD != 0) << i;
        block.quiet |= u16::from(class & (WORD | SPACE | PUNCT) != 0) << i;
        block.notable |= u16::from(class & NOTABLE != 0) << i;
    }
    block
}

/// [`Block`] with SSE2: a few compares of all sixteen bytes at once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn classify_block_sse2(bytes: &[u8; 16]) -> Block {
    use std::arch::x86_64::{
        __m128i, _mm_add_epi8, _mm_cmpeq_epi8, _mm_cmplt_epi8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8, _mm_set_epi64x,
    };
    let splat = |b: u8| _mm_set1_epi8(b as i8);
    // Bytes from `lo` to `hi`: moved so that `lo` lands on -128, then one signed compare (the
    // move is a bijection of the bytes, so no other byte lands in the range).
    let within = |v: __m128i, lo: u8, hi: u8| {
        let moved = _mm_add_epi8(v, splat(0x80u8.wrapping_sub(lo)));
        _mm_cmplt_epi8(moved, splat(0x80 + (hi - lo) + 1))
    };
    let [lo, hi] = [&bytes[..8], &bytes[8..]].map(|half| {
        let mut word = [0u8; 8];
        word.copy_from_slice(half);
        i64::from_le_bytes(word)
    });
    let x = _mm_set_epi64x(hi, lo);
    let eq = |b: u8| _mm_cmpeq_epi8(x, splat(b));
    let folded = _mm_or_si128(x, splat(0x20));
    let digit = within(x, b'0', b'9');
    let letter = within(folded, b'a', b'z');
    let word = _mm_or_si128(
        _mm_or_si128(digit, letter),
        _mm_or_si128(eq(b'_'), eq(b'$')),
    );
    let space = _mm_or_si128(eq(b' '), within(x, b'\t', b'\r'));
    let punct = _mm_or_si128(
        _mm_or_si128(within(x, b'<', b'>'), eq(b'*')),
        _mm_or_si128(eq(b','), eq(b'.')),
    );
    let quiet = _mm_or_si128(word, _mm_or_si128(space, punct));
    let notable = _mm_or_si128(
        _mm_or_si128(digit, eq(b'$')),
        _mm_or_si128(
            within(folded, b'd', b'm'),
            _mm_cmpeq_epi8(folded, splat(b'u')),
        ),
    );
    // Sixteen lanes: the masks fit in the low 16 bits.
    let mask = |v: __m128i| _mm_movemask_epi8(v) as u16;
    Block {
        word: mask(word),
        quiet: mask(quiet),
        notable: mask(notable),
    }
}

/// Sixteen bytes' classes, the fastest way this machine has.
#[inline]
fn classify_block(bytes: &[u8; 16]) -> Block {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE2 is part of the x86_64 baseline: every x86_64 processor has it.
    unsafe {
        classify_block_sse2(bytes)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        classify_block_by_table(bytes)
    }
}

/// The positions of a text, from some position on, that the fast paths must look at, in order:
/// each byte they do not pass quietly (anything but word bytes, whitespace and `= < > , . *`)
/// and the first byte of each word that starts with a notable byte (see [`NOTABLE`]). A word
/// running into the start position counts as starting there.
pub(super) struct Marks<'a> {
    text: &'a [u8],
    /// Where the next block starts.
    next: usize,
    /// The marks of the block before `next` not yet given, bit `i` for `next - 16 + i`.
    pending: u16,
    /// Whether the last byte of the block before `next` is a word byte.
    in_word: bool,
}

impl<'a> Marks<'a> {
    /// The marks of `text` from `from` on.
    pub(super) fn new(text: &'a [u8], from: usize) -> Self {
        Marks {
            text,
            next: from,
            pending: 0,
            in_word: false,
        }
    }
}

impl Iterator for Marks<'_> {
    type Item = usize;

    // Inlined into the fast paths' loops, which then load the compares' constants once.
    #[inline]
    fn next(&mut self) -> Option<usize> {
        while self.pending == 0 {
            let rest = self.text.get(self.next..)?;
            let block = match rest.first_chunk::<16>() {
                Some(bytes) => classify_block(bytes),
                None if rest.is_empty() => return None,
                // The last block is filled up with spaces, which are quiet and end a word.
                None => {
                    let mut bytes = [b' '; 16];
                    bytes[..rest.len()].copy_from_slice(rest);
                    classify_block(&bytes)
                }
            };
            let starts = block.word & !(block.word << 1 | u16::from(self.in_word));
            self.in_word = block.word & 0x8000 != 0;
            self.pending = starts & block.notable | !block.quiet;
            self.next += 16;
        }
        let bit = self.pending.trailing_zeros() as usize;
        self.pending &= self.pending - 1;
        Some(self.next - 16 + bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_classify_every_byte_as_the_table() {
        for b in 0..=255u8 {
            let mut bytes = [b' '; 16];
            bytes[b as usize % 16] = b;
            assert_eq!(
                classify_block(&bytes),
                classify_block_by_table(&bytes),
                "byte {b:#04x}"
            );
            let same = [b; 16];
            assert_eq!(
                classify_block(&same),
                classify_block_by_table(&same),
                "byte {b:#04x}"
            );
        }
    }

    /// The marks as the definition gives them, a byte at a time.
    fn marks_by_bytes(text: &[u8], from: usize) -> Vec<usize> {
        (from..text.len())
            .filter(|&i| {
                let class = CLASSES[usize::from(text[i])];
                let starts_word = class & WORD != 0 && (i == from || !is_word(text[i - 1]));
                class & (WORD | SPACE | PUNCT) == 0 || starts_word && class & NOTABLE != 0
            })
            .collect()
    }

    #[test]
    fn marks_of_a_statement_are_its_notable_words_and_its_other_bytes() {
        let text = b"SELECT abalance FROM pgbench_accounts WHERE aid = 12345;";
        let marks: Vec<usize> = Marks::new(text, 6).collect();
        // FROM, 12345 and the `;`.
        assert_eq!(marks, [16, 50, 55]);
        assert_eq!(marks, marks_by_bytes(text, 6));
        assert_eq!(Marks::new(text, text.len()).count(), 0);
        assert_eq!(Marks::new(text, text.len() + 1).count(), 0);
    }

    proptest::proptest! {
        #[test]
        fn marks_are_found_as_byte_by_byte(
            text in proptest::collection::vec(
                proptest::sample::select(b"aZ_$0DdFfiImMuUx9 \t\n.=<>*,;()'-\"\xe9\x80".to_vec()),
                0..80,
            ),
            from in 0usize..20,
        ) {
            let from = from.min(text.len());
            let marks: Vec<usize> = Marks::new(&text, from).collect();
            proptest::prop_assert_eq!(marks, marks_by_bytes(&text, from));
        }

        #[test]
        fn blocks_classify_any_block_as_the_table(bytes in proptest::array::uniform16(0u8..)) {
            proptest::prop_assert_eq!(classify_block(&bytes), classify_block_by_table(&bytes));
        }
    }
}
