//! Battle -> token ids: the classifier's input text and its turn-aware truncation.
//!
//! Layout, per included turn (oldest kept turn first):
//! `[special prefix] User prompt:\n{p}\n\nResponse A:\n{a}\n\nResponse B:\n{b}` and `\n\n`
//! between turns. Pieces are tokenized separately and concatenated, so truncation is exact
//! in tokens and never re-tokenizes a cut string. With `length_hints` the response markers
//! state each full response's length (`Response A (412 words):`): truncation cuts long
//! answers to similar lengths, and response length is the strongest single signal in arena
//! data (the length baseline lives on it), so the hint keeps it visible.
//!
//! Truncation to `max_len` follows what worked best in the competition: the latest turn
//! is kept first and older turns are dropped whole, oldest first; the prompt is capped
//! (`prompt_cap`), the longer answer is trimmed first, and every part keeps at least
//! `min_part` tokens when it has them. Text inside a part keeps its beginning.

use super::{Battle, Side, Turn};
use crate::cli::range;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::Path;

/// Truncation budgets, in tokens (also `verdict predict`'s flags for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::Args)]
pub struct FormatOptions {
    /// Longest input, special tokens included.
    #[arg(long, allow_negative_numbers = true, value_parser = range::count, default_value_t = FormatOptions::default().max_len)]
    pub max_len: usize,
    /// Most tokens a prompt keeps.
    #[arg(long, allow_negative_numbers = true, value_parser = range::whole, default_value_t = FormatOptions::default().prompt_cap)]
    pub prompt_cap: usize,
    /// Fewest tokens each part keeps (if it has them) before others give up more.
    #[arg(long, allow_negative_numbers = true, value_parser = range::whole, default_value_t = FormatOptions::default().min_part)]
    pub min_part: usize,
    /// State each response's full length in words in its marker (as the model was trained).
    #[arg(long)]
    #[serde(default)]
    pub length_hints: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            max_len: 1024,
            prompt_cap: 256,
            min_part: 32,
            length_hints: false,
        }
    }
}

/// One way a model reads a battle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// The whole battle as given.
    Given,
    /// The whole battle with A and B exchanged (swap pairs in training, swap TTA).
    Swapped,
    /// One side's responses alone, cut to a length (the response-embedding probe).
    Response(Side, usize),
}

impl View {
    /// The whole battle as given and, with `swap`, also swapped.
    pub fn whole(swap: bool) -> &'static [View] {
        if swap {
            &[View::Given, View::Swapped]
        } else {
            &[View::Given]
        }
    }
}

/// Stands in for a null turn, so the model can tell "no answer" from an empty one.
const NULL_TEXT: &str = "[no response]";

/// Turns battles into token ids with a model's tokenizer.
pub struct Formatter {
    tokenizer: tokenizers::Tokenizer,
    /// Special tokens the tokenizer puts in front of a text (e.g. Gemma's `<bos>`).
    prefix: Vec<u32>,
    prompt_marker: Vec<u32>,
    a_marker: Vec<u32>,
    b_marker: Vec<u32>,
    turn_separator: Vec<u32>,
    pub options: FormatOptions,
}

impl Formatter {
    /// Loads `tokenizer.json` from a model folder.
    pub fn from_model_dir(dir: &Path, options: FormatOptions) -> Result<Formatter> {
        let path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        Formatter::new(tokenizer, options)
    }

    /// Wraps a loaded tokenizer.
    pub fn new(mut tokenizer: tokenizers::Tokenizer, options: FormatOptions) -> Result<Formatter> {
        // User text is data: "<bos>" or "<|im_end|>" typed in a prompt must not become a
        // special token (it would also break pooling at the last non-pad token).
        tokenizer.set_encode_special_tokens(true);
        let raw = |text: &str| -> Result<Vec<u32>> {
            Ok(tokenizer
                .encode(text, false)
                .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?
                .get_ids()
                .to_vec())
        };
        let with_specials = tokenizer
            .encode("", true)
            .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?
            .get_ids()
            .to_vec();
        let formatter = Formatter {
            prefix: with_specials,
            prompt_marker: raw("User prompt:\n")?,
            a_marker: raw("\n\nResponse A:\n")?,
            b_marker: raw("\n\nResponse B:\n")?,
            turn_separator: raw("\n\n")?,
            tokenizer,
            options,
        };
        // A hinted marker is longest for the longest count a response could have.
        let fixed = formatter.prefix.len()
            + if options.length_hints {
                let longest = Some("w ".repeat(1_000_000));
                formatter.prompt_marker.len()
                    + formatter.response_marker('A', &longest)?.len()
                    + formatter.response_marker('B', &longest)?.len()
            } else {
                formatter.turn_markers_len()
            };
        if options.max_len < fixed + 3 {
            bail!(
                "--max-len {} is too short: markers and special tokens alone take {fixed} tokens",
                options.max_len
            );
        }
        Ok(formatter)
    }

    fn turn_markers_len(&self) -> usize {
        self.prompt_marker.len() + self.a_marker.len() + self.b_marker.len()
    }

    /// The marker in front of response `side` ('A' or 'B'): the fixed one, or with
    /// `length_hints` one that states the response's length in words.
    fn response_marker(&self, side: char, text: &Option<String>) -> Result<Vec<u32>> {
        if !self.options.length_hints {
            return Ok(if side == 'A' {
                &self.a_marker
            } else {
                &self.b_marker
            }
            .clone());
        }
        let words = text.as_deref().map_or(0, |t| t.split_whitespace().count());
        let marker = format!("\n\nResponse {side} ({words} words):\n");
        Ok(self
            .tokenizer
            .encode(marker.as_str(), false)
            .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// The tokens of `text`, or its first `limit + 1` when it has more: a caller that keeps
    /// at most `limit` only needs to know that there are more (the truncation plan compares
    /// lengths with budgets of at most `limit`, see `plan_truncation`).
    ///
    /// Work is bounded by `limit`, not by the text: a long text is tokenized by growing
    /// prefixes (from 16 bytes a token, doubling) until the prefix yields `LIMIT_MARGIN`
    /// tokens more than needed. Tokenization is local (a pre-token ends at the next space or
    /// punctuation), so tokens that far before the cut are those of the whole text; only the
    /// last few can differ. A 50 MB response read for 256 tokens costs a few kilobytes.
    fn tokens(&self, text: &Option<String>, limit: usize) -> Result<Vec<u32>> {
        const LIMIT_MARGIN: usize = 64;
        let text = text.as_deref().unwrap_or(NULL_TEXT);
        let need = limit + 1;
        let mut bytes = (need + LIMIT_MARGIN) * 16;
        loop {
            let cut = if bytes >= text.len() {
                text
            } else {
                &text[..text.floor_char_boundary(bytes)]
            };
            let mut ids = self
                .tokenizer
                .encode(cut, false)
                .map_err(|e| anyhow::anyhow!("tokenizer failed: {e}"))?
                .get_ids()
                .to_vec();
            if cut.len() == text.len() || ids.len() >= need + LIMIT_MARGIN {
                ids.truncate(need);
                return Ok(ids);
            }
            bytes *= 2;
        }
    }

    /// The token ids of one side's responses alone (turns joined by a blank line, after the
    /// tokenizer's special prefix), cut to `max_len`: what the response-embedding probe reads.
    /// Null and empty responses read as the null marker, so no sequence is empty.
    pub fn encode_response(&self, battle: &Battle, side: Side, max_len: usize) -> Result<Vec<u32>> {
        let mut ids = self.prefix.clone();
        for (t, text) in battle.responses(side).enumerate() {
            if t > 0 {
                ids.extend(&self.turn_separator);
            }
            let text = text.filter(|t| !t.is_empty()).map(str::to_string);
            ids.extend(self.tokens(&text, max_len)?);
            if ids.len() >= max_len {
                break;
            }
        }
        ids.truncate(max_len.max(self.prefix.len() + 1));
        Ok(ids)
    }

    /// The token ids of every battle in every view, battle-major: sequence
    /// `i * views.len() + v` is battle `i` read as `views[v]`. Every id is checked against
    /// the model's vocabulary of `vocab` entries, so a tokenizer.json that does not belong to
    /// the model is an error naming the battle, not an out-of-range embedding lookup.
    pub fn encode_views(
        &self,
        battles: &[Battle],
        views: &[View],
        vocab: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let sequences: Vec<Vec<u32>> = (0..battles.len() * views.len())
            .into_par_iter()
            .map(|j| {
                let battle = &battles[j / views.len()];
                match views[j % views.len()] {
                    View::Given => self.encode(battle),
                    View::Swapped => self.encode(&battle.swapped()),
                    View::Response(side, max_len) => self.encode_response(battle, side, max_len),
                }
            })
            .collect::<Result<_>>()?;
        for (j, s) in sequences.iter().enumerate() {
            if let Some(bad) = s.iter().find(|&&id| id as usize >= vocab) {
                bail!(
                    "battle {}: the tokenizer produced id {bad} but the model's vocabulary has {vocab} entries (wrong tokenizer.json for this model?)",
                    battles[j / views.len()].id
                );
            }
        }
        Ok(sequences)
    }

    /// The token ids of a battle, at most `max_len` long.
    pub fn encode(&self, battle: &Battle) -> Result<Vec<u32>> {
        // Per turn: prompt, response A, response B, then the two response markers.
        let turns: Vec<[Vec<u32>; 5]> = battle
            .turns
            .iter()
            .map(
                |Turn {
                     prompt,
                     response_a,
                     response_b,
                 }| {
                    Ok([
                        self.tokens(prompt, self.options.max_len)?,
                        self.tokens(response_a, self.options.max_len)?,
                        self.tokens(response_b, self.options.max_len)?,
                        self.response_marker('A', response_a)?,
                        self.response_marker('B', response_b)?,
                    ])
                },
            )
            .collect::<Result<_>>()
            .with_context(|| format!("battle {}", battle.id))?;
        let lengths: Vec<[usize; 3]> = turns
            .iter()
            .map(|t| [t[0].len(), t[1].len(), t[2].len()])
            .collect();
        // Hinted markers differ per turn; budgeting every turn for the longest is exact for
        // single-turn battles and wastes a few tokens at most otherwise.
        let markers_len = turns
            .iter()
            .map(|t| self.prompt_marker.len() + t[3].len() + t[4].len())
            .max()
            .unwrap_or(self.turn_markers_len());
        let plan = plan_truncation(
            &lengths,
            self.options,
            self.prefix.len(),
            markers_len,
            self.turn_separator.len(),
        );
        let mut ids = self.prefix.clone();
        for (turn, keep) in turns.iter().zip(&plan) {
            let Some([kp, ka, kb]) = *keep else { continue };
            if ids.len() > self.prefix.len() {
                ids.extend(&self.turn_separator);
            }
            ids.extend(&self.prompt_marker);
            ids.extend(&turn[0][..kp]);
            ids.extend(&turn[3]);
            ids.extend(&turn[1][..ka]);
            ids.extend(&turn[4]);
            ids.extend(&turn[2][..kb]);
        }
        debug_assert!(ids.len() <= self.options.max_len);
        Ok(ids)
    }
}

/// Tokens kept of (prompt, response A, response B) for each turn; `None` drops the turn.
///
/// Pure arithmetic on lengths, so the policy is tested without a tokenizer.
pub fn plan_truncation(
    lengths: &[[usize; 3]],
    options: FormatOptions,
    prefix_len: usize,
    markers_len: usize,
    separator_len: usize,
) -> Vec<Option<[usize; 3]>> {
    let mut plan = vec![None; lengths.len()];
    let mut remaining = options.max_len.saturating_sub(prefix_len);
    for (k, &[p, a, b]) in lengths.iter().enumerate().rev() {
        let latest = k + 1 == lengths.len();
        let overhead = markers_len + if latest { 0 } else { separator_len };
        let minimum =
            overhead + p.min(options.min_part) + a.min(options.min_part) + b.min(options.min_part);
        if !latest && remaining < minimum {
            break; // this turn and every older one are dropped
        }
        let budget = remaining.saturating_sub(overhead);
        let keep = fit_turn(p, a, b, budget, options);
        remaining = budget - keep.iter().sum::<usize>();
        plan[k] = Some(keep);
    }
    plan
}

/// Splits `budget` tokens over one turn's prompt and two responses.
fn fit_turn(p: usize, a: usize, b: usize, budget: usize, o: FormatOptions) -> [usize; 3] {
    let mut kp = p.min(o.prompt_cap);
    if kp + a + b <= budget {
        return [kp, a, b];
    }
    // Let the responses keep their minimum before the prompt keeps more than its own.
    let responses_min = a.min(o.min_part) + b.min(o.min_part);
    kp = kp
        .min(budget.saturating_sub(responses_min).max(p.min(o.min_part)))
        .min(budget);
    let rb = budget - kp;
    // Trim the longer answer first: the shorter keeps everything if it fits in half.
    let (ka, kb) = if a + b <= rb {
        (a, b)
    } else if a <= rb / 2 {
        (a, rb - a)
    } else if b <= rb / 2 {
        (rb - b, b)
    } else {
        (rb - rb / 2, rb / 2)
    };
    [kp, ka, kb]
}

/// A byte-level `tokenizer.json` (256 byte tokens after `<pad>`, `<bos>`, `<eos>`; BOS
/// added in front): a real tokenizer for tiny test models, loadable by transformers too.
pub fn byte_level_tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    let specials = ["<pad>", "<bos>", "<eos>"];
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for (byte, c) in byte_level_alphabet().iter().enumerate() {
        vocab.insert(c.to_string(), (specials.len() + byte).into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [1], "tokens": ["<bos>"]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    })
}

/// GPT-2's byte-to-character map used by ByteLevel pre-tokenizers: printable bytes map to
/// themselves, the rest to code points from 256 up, so every byte is a visible character.
fn byte_level_alphabet() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).expect("latin-1")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("BMP")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const O: FormatOptions = FormatOptions {
        max_len: 100,
        prompt_cap: 20,
        min_part: 5,
        length_hints: false,
    };

    fn total(plan: &[Option<[usize; 3]>], markers: usize, sep: usize) -> usize {
        let kept: Vec<_> = plan.iter().flatten().collect();
        kept.iter()
            .map(|k| k.iter().sum::<usize>() + markers)
            .sum::<usize>()
            + sep * kept.len().saturating_sub(1)
    }

    #[test]
    fn short_battle_is_kept_whole() {
        assert_eq!(
            plan_truncation(&[[3, 10, 12]], O, 1, 6, 2),
            vec![Some([3, 10, 12])]
        );
    }

    #[test]
    fn prompt_is_capped_even_when_room_is_left() {
        assert_eq!(
            plan_truncation(&[[50, 5, 5]], O, 1, 6, 2),
            vec![Some([20, 5, 5])]
        );
    }

    #[test]
    fn longer_answer_is_trimmed_first() {
        // budget for parts: 100 - 1 - 6 = 93; prompt 10, responses 83: short one keeps 30.
        let plan = plan_truncation(&[[10, 30, 500]], O, 1, 6, 2);
        assert_eq!(plan, vec![Some([10, 30, 53])]);
    }

    #[test]
    fn two_long_answers_share_equally() {
        let plan = plan_truncation(&[[10, 400, 500]], O, 1, 6, 2);
        assert_eq!(plan, vec![Some([10, 42, 41])]);
    }

    #[test]
    fn oldest_turns_are_dropped_first_and_never_partially() {
        let plan = plan_truncation(&[[10, 10, 10], [10, 10, 10], [10, 30, 31]], O, 1, 6, 2);
        assert_eq!(plan[2], Some([10, 30, 31]));
        assert_eq!(
            plan[1], None,
            "22 tokens left; an older turn needs 2 + 6 + 3 * 5 = 23"
        );
        assert_eq!(
            plan[0], None,
            "once a turn is dropped, all older ones are too"
        );
        let plan = plan_truncation(&[[3, 3, 3], [10, 10, 10], [10, 10, 10]], O, 1, 6, 2);
        assert!(plan.iter().all(|k| k.is_some()));
        assert!(total(&plan, 6, 2) + 1 <= O.max_len);
    }

    #[test]
    fn every_part_keeps_its_minimum_when_the_prompt_is_huge() {
        let tight = FormatOptions {
            max_len: 30,
            prompt_cap: 256,
            min_part: 5,
            length_hints: false,
        };
        let plan = plan_truncation(&[[500, 500, 500]], tight, 1, 6, 2);
        let [p, a, b] = plan[0].unwrap();
        assert!(a >= 5 && b >= 5 && p >= 5, "{:?}", plan[0]);
        assert_eq!(p + a + b, 30 - 1 - 6);
    }

    #[test]
    fn never_exceeds_max_len() {
        let mut rng = crate::rng::Rng::new(3);
        for _ in 0..2000 {
            let turns: Vec<[usize; 3]> = (0..1 + rng.below(4))
                .map(|_| [rng.below(300), rng.below(600), rng.below(600)])
                .collect();
            let o = FormatOptions {
                max_len: 20 + rng.below(400),
                prompt_cap: 1 + rng.below(100),
                min_part: rng.below(40),
                length_hints: false,
            };
            let plan = plan_truncation(&turns, o, 1, 6, 2);
            assert!(
                plan.last().unwrap().is_some(),
                "the latest turn is always kept"
            );
            assert!(
                total(&plan, 6, 2) + 1 <= o.max_len,
                "{turns:?} {o:?} {plan:?}"
            );
            for (k, t) in plan.iter().zip(&turns) {
                if let Some(k) = k {
                    assert!(k[0] <= t[0].min(o.prompt_cap) && k[1] <= t[1] && k[2] <= t[2]);
                }
            }
        }
    }

    /// `tokens(text, limit)` is the whole text's first `limit + 1` tokens, for texts whose
    /// shapes stress the prefix cut: words, a long run without spaces, long whitespace runs,
    /// multi-byte characters at the cut; with the byte-level tokenizer always, and with the
    /// real SmolLM2 and Gemma 3 tokenizers where tools/fetch-models.sh has put them.
    #[test]
    fn bounded_tokenization_keeps_the_whole_texts_first_tokens() {
        use std::io::Write;
        let texts = [
            "word ".repeat(5000),
            "x".repeat(30_000),
            format!("{}end", " ".repeat(20_000)),
            "é😀 ".repeat(4000),
            "The quick brown fox, jumping\n\tover 12345 lazy dogs!? ".repeat(800),
            "short".to_string(),
        ];
        let mut tokenizers = vec![(
            "byte-level".to_string(),
            tokenizers::Tokenizer::from_bytes(byte_level_tokenizer_json().to_string()).unwrap(),
        )];
        let models = crate::demo::fetched_models_dir();
        for name in ["smollm2-135m-instruct", "gemma3-270m"] {
            match tokenizers::Tokenizer::from_file(models.join(name).join("tokenizer.json")) {
                Ok(t) => tokenizers.push((name.to_string(), t)),
                // Past the harness's capture, so a passing run still says what it left out.
                Err(_) => drop(writeln!(
                    std::io::stderr(),
                    "SKIPPED the {name} tokenizer: not in {}",
                    models.display()
                )),
            }
        }
        for (name, tokenizer) in tokenizers {
            let formatter = Formatter::new(tokenizer.clone(), FormatOptions::default()).unwrap();
            for text in &texts {
                let whole = tokenizer
                    .encode(text.as_str(), false)
                    .unwrap()
                    .get_ids()
                    .to_vec();
                for limit in [0, 1, 255, 1024] {
                    let got = formatter.tokens(&Some(text.clone()), limit).unwrap();
                    assert_eq!(
                        got,
                        whole[..whole.len().min(limit + 1)],
                        "{name}, limit {limit}, text {:?}...",
                        &text[..20.min(text.len())]
                    );
                }
            }
        }
    }
}
