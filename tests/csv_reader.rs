//! Competition CSV edge cases. Each test names the input quirk it pins.

mod common;

use verdict::data::{BattleReader, ReadOptions, Winner};

const HEADER: &str =
    "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie\n";

fn read(
    text: &str,
    skip_bad_rows: bool,
) -> anyhow::Result<(Vec<verdict::data::Battle>, verdict::data::ReadStats)> {
    let mut reader = BattleReader::new(text.as_bytes(), "test.csv", ReadOptions { skip_bad_rows })?;
    let battles = reader.by_ref().collect::<anyhow::Result<Vec<_>>>()?;
    Ok((battles, reader.stats().clone()))
}

fn err(text: &str) -> String {
    format!("{:#}", read(text, false).unwrap_err())
}

#[test]
fn reads_labels_models_and_turns() {
    let text = format!("{HEADER}7,m1,m2,\"[\"\"hi\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",0,1,0\n");
    let (b, stats) = read(&text, false).unwrap();
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].id, "7");
    assert_eq!(b[0].model_a.as_deref(), Some("m1"));
    assert_eq!(b[0].turns[0].prompt.as_deref(), Some("hi"));
    assert_eq!(b[0].turns[0].response_b.as_deref(), Some("b"));
    assert_eq!(b[0].winner, Some(Winner::B));
    assert_eq!(stats.rows, 1);
}

#[test]
fn null_turns_become_none() {
    let text = format!("{HEADER}1,m1,m2,\"[\"\"q1\"\",\"\"q2\"\"]\",\"[null,\"\"x\"\"]\",\"[\"\"y\"\",null]\",0,0,1\n");
    let (b, _) = read(&text, false).unwrap();
    assert_eq!(b[0].turns.len(), 2, "multi-turn rows keep every turn");
    assert_eq!(b[0].turns[0].response_a, None);
    assert_eq!(b[0].turns[1].response_b, None);
    assert_eq!(b[0].winner, Some(Winner::Tie));
}

#[test]
fn lone_surrogates_are_replaced_and_counted() {
    let text = format!("{HEADER}1,m1,m2,\"[\"\"\\ud83d\"\"]\",\"[\"\"\\ud83d\\ude00\"\"]\",\"[\"\"\\ude00 x\"\"]\",1,0,0\n");
    let (b, stats) = read(&text, false).unwrap();
    assert_eq!(b[0].turns[0].prompt.as_deref(), Some("\u{FFFD}"));
    assert_eq!(b[0].turns[0].response_a.as_deref(), Some("😀"));
    assert_eq!(b[0].turns[0].response_b.as_deref(), Some("\u{FFFD} x"));
    assert_eq!(stats.lone_surrogates, 2);
}

#[test]
fn quotes_and_newlines_inside_fields_survive() {
    let text = format!("{HEADER}1,m1,m2,\"[\"\"line1\nline2, \\\"\"quoted\\\"\"\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,0,0\n2,m1,m2,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",0,1,0\n");
    let (b, _) = read(&text, false).unwrap();
    assert_eq!(
        b[0].turns[0].prompt.as_deref(),
        Some("line1\nline2, \"quoted\"")
    );
    assert_eq!(b[1].id, "2");
}

#[test]
fn bom_and_crlf_are_accepted() {
    let text = format!(
        "\u{feff}{}1,m1,m2,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,0,0\r\n",
        HEADER.replace('\n', "\r\n")
    );
    let (b, _) = read(&text, false).unwrap();
    assert_eq!(b[0].id, "1", "BOM must not corrupt the first column name");
    assert_eq!(
        b[0].winner,
        Some(Winner::A),
        "CR must not stick to the last field"
    );
}

#[test]
fn test_csv_without_labels_or_models() {
    let text =
        "id,prompt,response_a,response_b\n5,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\"\n";
    let (b, _) = read(text, false).unwrap();
    assert_eq!(b[0].winner, None);
    assert_eq!(b[0].model_a, None);
}

#[test]
fn empty_file_is_an_error() {
    assert!(err("").contains("empty file"), "{}", err(""));
}

#[test]
fn header_only_gives_no_rows() {
    let (b, stats) = read(HEADER, false).unwrap();
    assert!(b.is_empty());
    assert_eq!(stats.rows, 0);
}

#[test]
fn missing_column_is_named() {
    let e = err("id,prompt,response_a\n1,\"[]\",\"[]\"\n");
    assert!(e.contains("missing column 'response_b'"), "{e}");
}

#[test]
fn partial_label_columns_are_an_error() {
    let e = err("id,prompt,response_a,response_b,winner_model_a\n");
    assert!(e.contains("not all of winner"), "{e}");
}

#[test]
fn non_one_hot_labels_name_the_row_and_id() {
    let text = format!("{HEADER}1,m1,m2,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,0,0\n42,m1,m2,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,1,0\n");
    let e = err(&text);
    assert!(
        e.contains("test.csv: row 2") && e.contains("id 42") && e.contains("not one-hot"),
        "{e}"
    );
}

#[test]
fn bad_rows_are_errors_naming_the_problem_not_panics() {
    // Each case: the quirk, the row after the header, what the message must say.
    for (quirk, row, says) in [
        (
            "non-numeric label",
            "1,m1,m2,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",yes,0,0",
            "must be 0 or 1",
        ),
        (
            "differing turn counts",
            "1,m1,m2,\"[\"\"p\"\",\"\"q\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\",\"\"c\"\"]\",1,0,0",
            "turn counts differ: prompt 2, response_a 1, response_b 2",
        ),
        ("short row", "1,m1,m2,\"[\"\"p\"\"]\"", "row 1"),
    ] {
        let e = err(&format!("{HEADER}{row}\n"));
        assert!(e.contains(says), "{quirk}: {e}");
    }
}

#[test]
fn bad_json_list_is_an_error_naming_the_field() {
    let text = format!("{HEADER}1,m1,m2,\"[\"\"p\"\"\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,0,0\n");
    let e = err(&text);
    assert!(e.contains("row 1") && e.contains("'prompt'"), "{e}");
}

#[test]
fn skip_bad_rows_counts_instead_of_dropping_silently() {
    let good = "\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\"";
    let text = format!("{HEADER}1,m1,m2,{good},1,0,0\n2,m1,m2,{good},1,1,0\n3,m1,m2,\"[oops\",\"[]\",\"[]\",1,0,0\n4,m1,m2,{good},0,0,1\n");
    let (b, stats) = read(&text, true).unwrap();
    assert_eq!(
        b.iter().map(|b| b.id.as_str()).collect::<Vec<_>>(),
        ["1", "4"]
    );
    assert_eq!(stats.skipped_rows, 2);
    assert_eq!(stats.rows, 2);
}

#[test]
fn invalid_utf8_names_the_field() {
    let mut bytes = format!("{HEADER}1,m1,m2,\"[\"\"p\"\"]\",\"[\"\"").into_bytes();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    bytes.extend_from_slice(b"\"\"]\",\"[\"\"b\"\"]\",1,0,0\n");
    let mut reader = BattleReader::new(&bytes[..], "test.csv", ReadOptions::default()).unwrap();
    let e = format!("{:#}", reader.next().unwrap().unwrap_err());
    assert!(e.contains("'response_a' is not valid UTF-8"), "{e}");
}

#[test]
fn swapping_exchanges_responses_models_and_label() {
    let text = format!("{HEADER}1,m1,m2,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[null]\",1,0,0\n");
    let (b, _) = read(&text, false).unwrap();
    let s = b[0].swapped();
    assert_eq!(s.model_a.as_deref(), Some("m2"));
    assert_eq!(s.turns[0].response_a, None);
    assert_eq!(s.turns[0].response_b.as_deref(), Some("a"));
    assert_eq!(s.winner, Some(Winner::B));
    assert_eq!(s.swapped(), b[0]);
}

#[test]
fn real_arena_rows_read_cleanly_when_present() {
    let Some(path) = common::arena_dev() else {
        return;
    };
    let (b, stats) = verdict::data::read_battles(&path, ReadOptions::default()).unwrap();
    assert_eq!(b.len(), 1000);
    // This sample's surrogate escapes all come in pairs (checked with Python's json).
    assert_eq!(stats.lone_surrogates, 0);
    let astral = b
        .iter()
        .flat_map(|x| &x.turns)
        .flat_map(|t| [&t.prompt, &t.response_a, &t.response_b])
        .flatten()
        .any(|s| s.chars().any(|c| c as u32 > 0xFFFF));
    assert!(
        astral,
        "surrogate pairs (emoji) must decode to characters beyond the BMP"
    );
    let counts = [Winner::A, Winner::B, Winner::Tie]
        .map(|w| b.iter().filter(|x| x.winner == Some(w)).count());
    assert_eq!(counts, [344, 348, 308], "class counts from data/README.md");
}

/// One valid row with id `id` (labels: A wins).
fn row(id: &str) -> String {
    format!("{id},m1,m2,\"[\"\"p{id}\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\",1,0,0\n")
}

#[test]
fn utf16_file_names_the_encoding() {
    let text = format!("{HEADER}{}", row("1"));
    let mut bytes = vec![0xff, 0xfe];
    for unit in text.encode_utf16() {
        bytes.extend_from_slice(&unit.to_le_bytes());
    }
    let e = BattleReader::new(&bytes[..], "test.csv", ReadOptions::default())
        .err()
        .expect("a UTF-16 file is refused");
    let e = format!("{e:#}");
    assert!(
        e.contains("test.csv: the file is UTF-16 little-endian, not UTF-8"),
        "{e}"
    );
}

#[test]
fn a_column_named_twice_is_an_error() {
    let header = HEADER.replacen("model_b", "id", 1);
    let e = err(&format!("{header}{}", row("1")));
    assert!(
        e.contains("names column 'id' twice (columns 1 and 3)"),
        "{e}"
    );
}

#[test]
fn a_row_with_an_extra_field_is_an_error() {
    let extra = row("1").replace(",1,0,0\n", ",1,0,0,surplus\n");
    let e = err(&format!("{HEADER}{extra}"));
    assert!(
        e.contains("row 1") && e.contains("10 fields where the header has 9"),
        "{e}"
    );
}

#[test]
fn empty_and_repeated_ids_are_errors() {
    let e = err(&format!("{HEADER}{}", row("")));
    assert!(e.contains("row 1") && e.contains("empty id"), "{e}");
    let e = err(&format!("{HEADER}{}{}{}", row("7"), row("8"), row("7")));
    assert!(
        e.contains("row 3") && e.contains("id 7 repeats row 1's"),
        "{e}"
    );
    // Skipped with --skip-bad-rows like any malformed row, and counted.
    let (b, stats) = read(&format!("{HEADER}{}{}", row("7"), row("7")), true).unwrap();
    assert_eq!((b.len(), stats.skipped_rows), (1, 1));
}

#[test]
fn an_unclosed_quote_is_an_error_not_rows_swallowed() {
    // Row 2's model name opens a quote it never closes: the csv crate reads the rest of the
    // file (row 3) as that field's text and returns two rows without a word.
    let header = "id,prompt,response_a,response_b,model_a\n";
    let turns = "\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\"";
    let text = format!("{header}1,{turns},m1\n2,{turns},\"m2\n3,[null],[null],[null],m3\n");
    let e = err(&text);
    assert!(e.contains("test.csv: a quote is never closed"), "{e}");
    // When a later quote closes it, the row's field count gives it away.
    let text = format!("{header}1,{turns},m1\n2,{turns},\"m2\n3,{turns},m3\n");
    let e = err(&text);
    assert!(
        e.contains("row 2") && e.contains("fields where the header has 5"),
        "{e}"
    );
}
