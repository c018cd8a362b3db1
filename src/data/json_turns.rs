//! Parser for the competition's JSON-encoded turn lists (`["first turn", null, "..."]`).
//!
//! A hand-written parser rather than serde_json because real rows hold lone UTF-16
//! surrogate escapes (`"\ud83d"` cut from its pair), which serde_json rejects and which must
//! not cost us the row: each one becomes U+FFFD and is counted.

use std::fmt;

/// A list of turns; `None` is a JSON `null` entry.
pub type Turns = Vec<Option<String>>;

/// Why a turn list could not be parsed, with the byte offset where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonTurnsError {
    pub offset: usize,
    pub problem: String,
}

impl fmt::Display for JsonTurnsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}", self.problem, self.offset)
    }
}

impl std::error::Error for JsonTurnsError {}

/// Parses a JSON array whose entries are strings or `null`.
///
/// Returns the turns and the number of lone surrogates replaced by U+FFFD.
pub fn parse_turns(text: &str) -> Result<(Turns, usize), JsonTurnsError> {
    let mut p = Parser {
        s: text.as_bytes(),
        i: 0,
        lone_surrogates: 0,
    };
    let turns = p.list()?;
    p.skip_ws();
    if p.i != p.s.len() {
        return Err(p.err("unexpected text after the closing ']'"));
    }
    Ok((turns, p.lone_surrogates))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    lone_surrogates: usize,
}

impl Parser<'_> {
    fn err(&self, problem: &str) -> JsonTurnsError {
        JsonTurnsError {
            offset: self.i,
            problem: problem.to_string(),
        }
    }

    fn skip_ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn expect(&mut self, b: u8) -> Result<(), JsonTurnsError> {
        self.skip_ws();
        if self.s.get(self.i) == Some(&b) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected '{}'", b as char)))
        }
    }

    fn list(&mut self) -> Result<Turns, JsonTurnsError> {
        self.expect(b'[')?;
        let mut turns = Vec::new();
        self.skip_ws();
        if self.s.get(self.i) == Some(&b']') {
            self.i += 1;
            return Ok(turns);
        }
        loop {
            self.skip_ws();
            match self.s.get(self.i) {
                Some(b'"') => turns.push(Some(self.string()?)),
                Some(b'n') if self.s[self.i..].starts_with(b"null") => {
                    self.i += 4;
                    turns.push(None);
                }
                Some(_) => return Err(self.err("a turn must be a string or null")),
                None => return Err(self.err("unterminated list")),
            }
            self.skip_ws();
            match self.s.get(self.i) {
                Some(b',') => self.i += 1,
                Some(b']') => {
                    self.i += 1;
                    return Ok(turns);
                }
                Some(_) => return Err(self.err("expected ',' or ']'")),
                None => return Err(self.err("unterminated list")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u16, JsonTurnsError> {
        let digits = self
            .s
            .get(self.i..self.i + 4)
            .ok_or_else(|| self.err("truncated \\u escape"))?;
        let text = std::str::from_utf8(digits).map_err(|_| self.err("bad \\u escape"))?;
        let v = u16::from_str_radix(text, 16).map_err(|_| self.err("bad \\u escape"))?;
        self.i += 4;
        Ok(v)
    }

    /// Parses a string starting at the opening quote.
    fn string(&mut self) -> Result<String, JsonTurnsError> {
        self.i += 1;
        let mut out = String::new();
        loop {
            // Copy the run of plain bytes up to the next quote or backslash in one go.
            let start = self.i;
            while self.i < self.s.len() && !matches!(self.s[self.i], b'"' | b'\\') {
                self.i += 1;
            }
            // The input is a &str and we only split at ASCII bytes, so this is valid UTF-8.
            out.push_str(std::str::from_utf8(&self.s[start..self.i]).expect("split at ASCII"));
            match self.s.get(self.i) {
                None => return Err(self.err("unterminated string")),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(out);
                }
                Some(_) => {
                    self.i += 1;
                    let esc = *self
                        .s
                        .get(self.i)
                        .ok_or_else(|| self.err("unterminated escape"))?;
                    self.i += 1;
                    match esc {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let c = self.unicode_escape()?;
                            out.push(c);
                        }
                        _ => {
                            self.i -= 1;
                            return Err(self.err("unknown escape"));
                        }
                    }
                }
            }
        }
    }

    /// Decodes the code point after `\u`, pairing surrogates; a lone one becomes U+FFFD.
    fn unicode_escape(&mut self) -> Result<char, JsonTurnsError> {
        let first = self.hex4()?;
        match first {
            0xD800..=0xDBFF => {
                if self.s[self.i..].starts_with(b"\\u") {
                    let save = self.i;
                    self.i += 2;
                    let second = self.hex4()?;
                    if (0xDC00..=0xDFFF).contains(&second) {
                        let c =
                            0x10000 + ((first as u32 - 0xD800) << 10) + (second as u32 - 0xDC00);
                        return Ok(char::from_u32(c).expect("valid surrogate pair"));
                    }
                    // Not a low surrogate: leave it to be decoded on its own.
                    self.i = save;
                }
                self.lone_surrogates += 1;
                Ok(char::REPLACEMENT_CHARACTER)
            }
            0xDC00..=0xDFFF => {
                self.lone_surrogates += 1;
                Ok(char::REPLACEMENT_CHARACTER)
            }
            _ => Ok(char::from_u32(first as u32).expect("BMP non-surrogate")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strings_and_nulls() {
        let (t, n) = parse_turns(r#"["a", null , "b\"c"]"#).unwrap();
        assert_eq!(t, vec![Some("a".into()), None, Some("b\"c".into())]);
        assert_eq!(n, 0);
    }

    #[test]
    fn decodes_surrogate_pair_and_replaces_lone_ones() {
        let (t, n) = parse_turns(r#"["\ud83d\ude00 \ud83d x \ude00 \ud83d\u0041"]"#).unwrap();
        assert_eq!(t[0].as_deref(), Some("😀 \u{FFFD} x \u{FFFD} \u{FFFD}A"));
        assert_eq!(n, 3);
    }

    #[test]
    fn keeps_raw_utf8_and_escapes() {
        let (t, _) = parse_turns("[\"é\\n\\t\\u00e9\\/\"]").unwrap();
        assert_eq!(t[0].as_deref(), Some("é\n\té/"));
    }

    #[test]
    fn empty_list_is_empty() {
        assert_eq!(
            parse_turns(" [ ] ").unwrap().0,
            Vec::<Option<String>>::new()
        );
    }

    #[test]
    fn rejects_malformed_lists() {
        for bad in [
            "",
            "[",
            "[\"a\"",
            "[\"a\",]",
            "[1]",
            "{\"a\":1}",
            "[\"a\"] x",
            "[\"\\q\"]",
            "[\"\\u12\"]",
        ] {
            assert!(parse_turns(bad).is_err(), "accepted {bad:?}");
        }
    }
}
