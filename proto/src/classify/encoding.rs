//! Which `client_encoding`s the byte lexer can read.

/// Whether SQL text in this `client_encoding` can be classified byte by byte.
///
/// SJIS, BIG5, GBK, UHC, GB18030 and JOHAB are client-only encodings whose second byte of a
/// multibyte character may be an ASCII byte such as `\` (0x5C) or `'`: a lexer that does not
/// decode them can see a quote that is not one. For those, and for names it does not know, the
/// answer is `false` and the router must send the statement to the primary. Names are compared
/// as PostgreSQL does (`clean_encoding_name` in `encnames.c`): ASCII case and every
/// non-alphanumeric byte are ignored, so `Shift_JIS` and `sjis` are the same.
pub fn encoding_is_safe(name: &[u8]) -> bool {
    let mut buf = [0u8; 16];
    let mut len = 0;
    for &b in name.iter().filter(|b| b.is_ascii_alphanumeric()) {
        let Some(slot) = buf.get_mut(len) else {
            return false;
        };
        *slot = b.to_ascii_lowercase();
        len += 1;
    }
    buf.get(..len)
        .is_some_and(|clean| SAFE.binary_search(&clean).is_ok())
}

/// Cleaned names (and aliases, from `encnames.c`) of the encodings whose multibyte sequences
/// never contain ASCII bytes (sorted).
const SAFE: &[&[u8]] = &[
    b"abc",
    b"alt",
    b"euccn",
    b"eucjis2004",
    b"eucjp",
    b"euckr",
    b"euctw",
    b"iso88591",
    b"iso885910",
    b"iso885913",
    b"iso885914",
    b"iso885915",
    b"iso885916",
    b"iso88592",
    b"iso88593",
    b"iso88594",
    b"iso88595",
    b"iso88596",
    b"iso88597",
    b"iso88598",
    b"iso88599",
    b"koi8",
    b"koi8r",
    b"koi8u",
    b"latin1",
    b"latin10",
    b"latin2",
    b"latin3",
    b"latin4",
    b"latin5",
    b"latin6",
    b"latin7",
    b"latin8",
    b"latin9",
    b"muleinternal",
    b"sqlascii",
    b"tcvn",
    b"tcvn5712",
    b"unicode",
    b"utf8",
    b"vscii",
    b"win",
    b"win1250",
    b"win1251",
    b"win1252",
    b"win1253",
    b"win1254",
    b"win1255",
    b"win1256",
    b"win1257",
    b"win1258",
    b"win866",
    b"win874",
    b"windows1250",
    b"windows1251",
    b"windows1252",
    b"windows1253",
    b"windows1254",
    b"windows1255",
    b"windows1256",
    b"windows1257",
    b"windows1258",
    b"windows866",
    b"windows874",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_list_is_sorted() {
        assert!(SAFE.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn ascii_safe_encodings_are_safe_and_others_are_not() {
        for name in [
            "UTF8",
            "utf-8",
            "UNICODE",
            "SQL_ASCII",
            "LATIN1",
            "EUC_JP",
            "WIN1252",
            "ISO_8859_5",
        ] {
            assert!(encoding_is_safe(name.as_bytes()), "{name}");
        }
        for name in [
            "SJIS",
            "Shift_JIS",
            "BIG5",
            "GBK",
            "UHC",
            "GB18030",
            "JOHAB",
            "WIN932",
            "",
            "klingon",
        ] {
            assert!(!encoding_is_safe(name.as_bytes()), "{name}");
        }
    }
}
