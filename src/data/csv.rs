//! Streaming reader for the competition's train.csv / test.csv.
//!
//! Rows are parsed one at a time from a buffered reader, so the 57k-row train.csv reads
//! with flat memory. A malformed row is an error naming the file, row and id; with
//! `skip_bad_rows` it becomes a counted warning instead — never a silent drop.
//!
//! What a CSV parser accepts but a competition file must not have is refused here too: a
//! UTF-16 file, a header naming a column twice, a row with more or fewer fields than the
//! header, an empty or repeated id, and a quote left open (which would read every row after
//! it as text of one field).

use super::json_turns::parse_turns;
use super::{Battle, Turn, Winner};
use anyhow::{bail, Context, Result};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// How to treat malformed rows.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOptions {
    /// Report malformed rows as warnings (counted in [`ReadStats`]) instead of failing.
    pub skip_bad_rows: bool,
}

/// The `--skip-bad-rows` flag of every command that reads a competition CSV.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct ReadArgs {
    /// Warn about and skip malformed CSV rows (counted) instead of failing.
    #[arg(long)]
    pub skip_bad_rows: bool,
}

impl ReadArgs {
    pub fn options(self) -> ReadOptions {
        ReadOptions {
            skip_bad_rows: self.skip_bad_rows,
        }
    }
}

/// What a read saw, beyond the battles themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReadStats {
    /// Rows returned as battles.
    pub rows: usize,
    /// Malformed rows skipped (only with `skip_bad_rows`).
    pub skipped_rows: usize,
    /// Lone UTF-16 surrogate escapes replaced by U+FFFD.
    pub lone_surrogates: usize,
}

/// Column positions, found by name in the header.
struct Columns {
    id: usize,
    prompt: usize,
    response_a: usize,
    response_b: usize,
    model_a: Option<usize>,
    model_b: Option<usize>,
    /// `winner_model_a`, `winner_model_b`, `winner_tie`: all three or none (test.csv).
    winners: Option<[usize; 3]>,
}

impl Columns {
    fn from_header(header: &csv::ByteRecord, source: &str) -> Result<Columns> {
        let find = |name: &str| header.iter().position(|h| h == name.as_bytes());
        let need = |name: &str| {
            find(name).with_context(|| {
                let found: Vec<String> = header
                    .iter()
                    .map(|h| String::from_utf8_lossy(h).into_owned())
                    .collect();
                format!(
                    "{source}: missing column '{name}' (header has: {})",
                    found.join(", ")
                )
            })
        };
        let winners = ["winner_model_a", "winner_model_b", "winner_tie"].map(find);
        let winners = match winners {
            [Some(a), Some(b), Some(t)] => Some([a, b, t]),
            [None, None, None] => None,
            _ => bail!(
                "{source}: has some but not all of winner_model_a, winner_model_b, winner_tie"
            ),
        };
        Ok(Columns {
            id: need("id")?,
            prompt: need("prompt")?,
            response_a: need("response_a")?,
            response_b: need("response_b")?,
            model_a: find("model_a"),
            model_b: find("model_b"),
            winners,
        })
    }
}

/// A reader that counts the quote characters passing through it. In a well-formed CSV every
/// quote is one of a pair (opening and closing, or a doubled quote inside a field), so an odd
/// count at the end means a quoted field was never closed: the csv crate then takes the rest
/// of the file as that field's text, silently.
struct QuoteCounter<R> {
    inner: R,
    quotes: u64,
}

impl<R: Read> Read for QuoteCounter<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.quotes += buf[..n].iter().filter(|&&b| b == b'"').count() as u64;
        Ok(n)
    }
}

/// Iterator over the battles of one CSV source.
pub struct BattleReader<R: Read> {
    source: String,
    csv: csv::Reader<QuoteCounter<R>>,
    columns: Columns,
    /// Fields of the header: every row must have as many.
    fields: usize,
    record: csv::ByteRecord,
    row: usize,
    /// The row each id was first seen in.
    ids: HashMap<String, usize>,
    /// The unterminated-quote check has run (at the end of the source).
    finished: bool,
    options: ReadOptions,
    stats: ReadStats,
}

impl BattleReader<BufReader<File>> {
    /// Opens a CSV file and reads its header.
    pub fn open(path: &Path, options: ReadOptions) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        BattleReader::new(
            BufReader::with_capacity(1 << 20, file),
            &path.display().to_string(),
            options,
        )
    }
}

impl<R: Read> BattleReader<R> {
    /// Reads the header from any reader; `source` names it in error messages.
    pub fn new(reader: R, source: &str, options: ReadOptions) -> Result<Self> {
        // `flexible` so that a short or long row is our error (naming the row), not csv's.
        let mut csv = csv::ReaderBuilder::new()
            .flexible(true)
            .from_reader(QuoteCounter {
                inner: reader,
                quotes: 0,
            });
        let header = csv
            .byte_headers()
            .with_context(|| format!("{source}: cannot read the header"))?
            .clone();
        if header.is_empty() || (header.len() == 1 && header[0].is_empty()) {
            bail!(
                "{source}: empty file (expected a header with id, prompt, response_a, response_b)"
            );
        }
        check_encoding(header.as_slice(), source)?;
        for (i, name) in header.iter().enumerate() {
            if let Some(j) = header.iter().skip(i + 1).position(|other| other == name) {
                bail!(
                    "{source}: the header names column '{}' twice (columns {} and {})",
                    String::from_utf8_lossy(name),
                    i + 1,
                    i + j + 2
                );
            }
        }
        let columns = Columns::from_header(&header, source)?;
        Ok(BattleReader {
            source: source.to_string(),
            csv,
            columns,
            fields: header.len(),
            record: csv::ByteRecord::new(),
            row: 0,
            ids: HashMap::new(),
            finished: false,
            options,
            stats: ReadStats::default(),
        })
    }

    /// Counts so far (complete once the iterator is exhausted).
    pub fn stats(&self) -> &ReadStats {
        &self.stats
    }

    /// Whether the source has the three label columns.
    pub fn has_labels(&self) -> bool {
        self.columns.winners.is_some()
    }

    fn field(&self, index: usize, name: &str) -> Result<&str> {
        let bytes = self
            .record
            .get(index)
            .with_context(|| format!("missing field '{name}'"))?;
        std::str::from_utf8(bytes)
            .map_err(|e| anyhow::anyhow!("field '{name}' is not valid UTF-8 ({e})"))
    }

    fn turns(&mut self, index: usize, name: &str) -> Result<Vec<Option<String>>> {
        let (turns, lone) = parse_turns(self.field(index, name)?)
            .map_err(|e| anyhow::anyhow!("field '{name}' is not a JSON list of strings: {e}"))?;
        self.stats.lone_surrogates += lone;
        Ok(turns)
    }

    fn winner(&self) -> Result<Option<Winner>> {
        let Some(cols) = self.columns.winners else {
            return Ok(None);
        };
        let names = ["winner_model_a", "winner_model_b", "winner_tie"];
        let mut hot = Vec::new();
        for (k, (&col, name)) in cols.iter().zip(names).enumerate() {
            let text = self.field(col, name)?.trim();
            match text.parse::<f64>() {
                Ok(v) if v == 1.0 => hot.push(Winner::ALL[k]),
                Ok(v) if v == 0.0 => {}
                _ => bail!("label '{name}' must be 0 or 1, found {text:?}"),
            }
        }
        match hot.as_slice() {
            [w] => Ok(Some(*w)),
            _ => bail!(
                "labels are not one-hot: {} of winner_model_a/winner_model_b/winner_tie are 1",
                hot.len()
            ),
        }
    }

    fn parse_record(&mut self) -> Result<Battle> {
        if self.record.len() != self.fields {
            bail!(
                "{} fields where the header has {} (an unquoted comma, or a quote opened in one \
                 field and closed in another?)",
                self.record.len(),
                self.fields
            );
        }
        let c = &self.columns;
        let (id_col, p_col, a_col, b_col, ma, mb) = (
            c.id,
            c.prompt,
            c.response_a,
            c.response_b,
            c.model_a,
            c.model_b,
        );
        let id = self.field(id_col, "id")?.to_string();
        if id.trim().is_empty() {
            bail!("empty id");
        }
        if let Some(first) = self.ids.get(&id) {
            bail!("id {id} repeats row {first}'s (ids must be unique)");
        }
        let prompts = self.turns(p_col, "prompt")?;
        let responses_a = self.turns(a_col, "response_a")?;
        let responses_b = self.turns(b_col, "response_b")?;
        if prompts.is_empty() {
            bail!("prompt has no turns");
        }
        if prompts.len() != responses_a.len() || prompts.len() != responses_b.len() {
            bail!(
                "turn counts differ: prompt {}, response_a {}, response_b {}",
                prompts.len(),
                responses_a.len(),
                responses_b.len()
            );
        }
        let model = |col: Option<usize>, name| -> Result<Option<String>> {
            col.map(|c| self.field(c, name).map(str::to_string))
                .transpose()
        };
        let model_a = model(ma, "model_a")?;
        let model_b = model(mb, "model_b")?;
        let winner = self.winner()?;
        let turns = prompts
            .into_iter()
            .zip(responses_a)
            .zip(responses_b)
            .map(|((prompt, response_a), response_b)| Turn {
                prompt,
                response_a,
                response_b,
            })
            .collect();
        self.ids.insert(id.clone(), self.row);
        Ok(Battle {
            id,
            model_a,
            model_b,
            turns,
            winner,
        })
    }
}

impl<R: Read> Iterator for BattleReader<R> {
    type Item = Result<Battle>;

    fn next(&mut self) -> Option<Result<Battle>> {
        loop {
            match self.csv.read_byte_record(&mut self.record) {
                Ok(false) if self.finished => return None,
                Ok(false) => {
                    self.finished = true;
                    if self.csv.get_ref().quotes % 2 == 1 {
                        return Some(Err(anyhow::anyhow!(
                            "{}: a quote is never closed (the file has an odd number of '\"'), \
                             so the rows after it were read as one field's text; the last row \
                             read was row {}",
                            self.source,
                            self.row
                        )));
                    }
                    return None;
                }
                Ok(true) => {}
                Err(e) => {
                    return Some(Err(anyhow::anyhow!(
                        "{}: row {}: unreadable CSV: {e}",
                        self.source,
                        self.row + 1
                    )))
                }
            }
            self.row += 1;
            let line = self.record.position().map_or(0, |p| p.line());
            match self.parse_record() {
                Ok(battle) => {
                    self.stats.rows += 1;
                    return Some(Ok(battle));
                }
                Err(e) => {
                    let id = self
                        .record
                        .get(self.columns.id)
                        .map(String::from_utf8_lossy)
                        .unwrap_or_default();
                    let msg = format!(
                        "{}: row {} (line {line}, id {id}): {e}",
                        self.source, self.row
                    );
                    if !self.options.skip_bad_rows {
                        return Some(Err(anyhow::anyhow!(msg)));
                    }
                    self.stats.skipped_rows += 1;
                    eprintln!("warning: skipping {msg}");
                }
            }
        }
    }
}

/// Refuses a UTF-16 file (a byte-order mark, or NUL bytes between the header's letters),
/// which would otherwise read as "missing column 'id'" with the header in mojibake.
fn check_encoding(header: &[u8], source: &str) -> Result<()> {
    let bom = match header {
        [0xff, 0xfe, ..] => Some("UTF-16 little-endian"),
        [0xfe, 0xff, ..] => Some("UTF-16 big-endian"),
        _ => None,
    };
    if let Some(encoding) = bom.or(header.contains(&0).then_some("UTF-16 (NUL bytes)")) {
        bail!("{source}: the file is {encoding}, not UTF-8; save it as UTF-8 (e.g. `iconv -f UTF-16 -t UTF-8`)");
    }
    Ok(())
}

/// Reads a whole CSV file into memory.
pub fn read_battles(path: &Path, options: ReadOptions) -> Result<(Vec<Battle>, ReadStats)> {
    let mut reader = BattleReader::open(path, options)?;
    let battles = reader.by_ref().collect::<Result<Vec<_>>>()?;
    let stats = reader.stats().clone();
    report_skipped(path, &stats);
    Ok((battles, stats))
}

/// Prints the summary warning of a read that skipped malformed rows (nothing otherwise).
pub fn report_skipped(path: &Path, stats: &ReadStats) {
    if stats.skipped_rows > 0 {
        eprintln!(
            "warning: {}: skipped {} malformed row(s), kept {}",
            path.display(),
            stats.skipped_rows,
            stats.rows
        );
    }
}
