//! Battle -> token ids with a real tokenizer.json (the built-in byte-level one).

use verdict::data::format::{byte_level_tokenizer_json, FormatOptions, Formatter};
use verdict::data::{Battle, Turn};

/// The built-in byte-level tokenizer.
fn tokenizer() -> tokenizers::Tokenizer {
    let json = serde_json::to_vec(&byte_level_tokenizer_json()).unwrap();
    tokenizers::Tokenizer::from_bytes(json).unwrap()
}

fn formatter(options: FormatOptions) -> Formatter {
    Formatter::new(tokenizer(), options).unwrap()
}

/// Options with these limits, length hints off.
fn options(max_len: usize, prompt_cap: usize, min_part: usize) -> FormatOptions {
    FormatOptions {
        max_len,
        prompt_cap,
        min_part,
        length_hints: false,
    }
}

fn battle(turns: &[(&str, Option<&str>, Option<&str>)]) -> Battle {
    Battle {
        id: "1".into(),
        model_a: None,
        model_b: None,
        turns: turns
            .iter()
            .map(|(p, a, b)| Turn {
                prompt: Some(p.to_string()),
                response_a: a.map(str::to_string),
                response_b: b.map(str::to_string),
            })
            .collect(),
        winner: None,
    }
}

/// Byte-level ids back to text (ids 0..3 are specials).
fn text(ids: &[u32]) -> String {
    String::from_utf8_lossy(
        &ids.iter()
            .filter(|&&i| i >= 3)
            .map(|&i| (i - 3) as u8)
            .collect::<Vec<_>>(),
    )
    .into_owned()
}

#[test]
fn byte_level_tokenizer_adds_bos_and_maps_bytes() {
    let f = formatter(FormatOptions::default());
    let ids = f.encode(&battle(&[("hi", Some("é"), None)])).unwrap();
    assert_eq!(ids[0], 1, "BOS from the tokenizer's post-processor");
    assert_eq!(
        text(&ids),
        "User prompt:\nhi\n\nResponse A:\né\n\nResponse B:\n[no response]"
    );
}

#[test]
fn special_token_text_in_user_data_stays_text() {
    let f = formatter(FormatOptions::default());
    let ids = f
        .encode(&battle(&[("<pad><eos>", Some("<bos>"), Some("x"))]))
        .unwrap();
    assert_eq!(
        ids.iter().filter(|&&i| i < 3).count(),
        1,
        "only the real BOS may be special: {ids:?}"
    );
    assert!(text(&ids).contains("<pad><eos>"));
}

#[test]
fn multi_turn_keeps_latest_turn_and_fits_max_len() {
    let long = "x".repeat(400);
    let f = formatter(options(200, 40, 10));
    let ids = f
        .encode(&battle(&[
            ("first question", Some(&long), Some(&long)),
            ("second question", Some("short"), Some(&long)),
        ]))
        .unwrap();
    assert!(ids.len() <= 200);
    let t = text(&ids);
    assert!(t.contains("second question") && t.contains("short"), "{t}");
    assert!(
        !t.contains("first question"),
        "the oldest turn goes first: {t}"
    );
}

#[test]
fn swapping_changes_the_encoding() {
    let f = formatter(FormatOptions::default());
    let b = battle(&[("q", Some("yes"), Some("no"))]);
    let (x, y) = (f.encode(&b).unwrap(), f.encode(&b.swapped()).unwrap());
    assert_ne!(x, y);
    assert!(text(&y).ends_with("Response A:\nno\n\nResponse B:\nyes"));
}

#[test]
fn too_short_max_len_is_a_clear_error() {
    let err = Formatter::new(tokenizer(), options(10, 5, 1))
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("--max-len 10 is too short"),
        "{err}"
    );
}

#[test]
fn length_hints_state_full_lengths_even_when_truncated() {
    let hinted = FormatOptions {
        length_hints: true,
        ..options(120, 20, 10)
    };
    let f = formatter(hinted);
    let long = "word ".repeat(300);
    let b = battle(&[("q", Some("one two  three"), Some(&long))]);
    let ids = f.encode(&b).unwrap();
    assert!(ids.len() <= 120, "{}", ids.len());
    let t = text(&ids);
    assert!(
        t.starts_with("User prompt:\nq\n\nResponse A (3 words):\none two  three\n\nResponse B (300 words):\nword"),
        "the cut response still states its full length: {t}"
    );
    let swapped = text(&f.encode(&b.swapped()).unwrap());
    assert!(swapped.contains("Response A (300 words)") && swapped.contains("Response B (3 words)"));
    let null = text(&f.encode(&battle(&[("q", None, Some(""))])).unwrap());
    assert!(
        null.contains("Response A (0 words):\n[no response]")
            && null.ends_with("Response B (0 words):\n"),
        "{null}"
    );
}

#[test]
fn length_hints_need_room_for_the_longest_marker() {
    let unhinted = options(50, 5, 1);
    assert!(Formatter::new(tokenizer(), unhinted).is_ok());
    let hinted = FormatOptions {
        length_hints: true,
        ..unhinted
    };
    let err = Formatter::new(tokenizer(), hinted).err().unwrap();
    assert!(
        err.to_string().contains("--max-len 50 is too short"),
        "{err}"
    );
}
