//! A corpus of bad inputs, through the command line as a user meets them: competition CSVs,
//! JSON turn lists, configs, safetensors, tokenizers, adapters, run folders, prediction files
//! and numeric flags. Every case must be refused with a non-zero exit (1: the input, 2: a
//! flag, as clap reports it) and a message naming the file, row, setting or flag and the
//! problem — never a panic (101), an abort, or a success.

mod common;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// One bad input: the command, the exit code, and what its message must contain.
struct Case {
    name: String,
    args: Vec<String>,
    code: i32,
    says: Vec<String>,
}

/// Builds the cases' files in one temporary folder.
struct Corpus {
    dir: tempfile::TempDir,
    model: PathBuf,
    sample: PathBuf,
    cases: Vec<Case>,
}

const HEADER: &str =
    "id,model_a,model_b,prompt,response_a,response_b,winner_model_a,winner_model_b,winner_tie";

/// A valid labelled row with id `id` (A wins).
fn row(id: usize) -> String {
    format!("{id},m1,m2,\"[\"\"q{id}\"\"]\",\"[\"\"a\"\"]\",\"[\"\"bb\"\"]\",1,0,0")
}

impl Corpus {
    fn new() -> Corpus {
        let dir = tempfile::tempdir().unwrap();
        let (model, sample) = common::tiny_classifier_and_rows(dir.path(), 30);
        Corpus {
            dir,
            model,
            sample,
            cases: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, bytes: impl AsRef<[u8]>) -> String {
        let path = self.path(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    }

    fn case(&mut self, name: &str, args: &[&str], code: i32, says: &[&str]) {
        self.cases.push(Case {
            name: name.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            code,
            says: says.iter().map(|s| s.to_string()).collect(),
        });
    }

    /// A CSV of `body` (after the standard header) given to `baseline cv`.
    fn csv_case(&mut self, name: &str, body: &str, says: &[&str]) {
        self.raw_csv_case(name, format!("{HEADER}\n{body}\n"), says);
    }

    /// A CSV file of exactly `bytes` given to `baseline cv`; the message must name it too.
    fn raw_csv_case(&mut self, name: &str, bytes: impl AsRef<[u8]>, says: &[&str]) {
        let file = format!("{name}.csv");
        let path = self.write(&file, bytes);
        let mut says = says.to_vec();
        says.push(&file);
        self.case(name, &["baseline", "cv", "--train", &path], 1, &says);
    }

    /// A copy of the tiny model under `name`, with `edit` applied to its config.json.
    fn model_copy(&self, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
        let dir = self.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "model.safetensors", "tokenizer.json"] {
            std::fs::copy(self.model.join(f), dir.join(f)).unwrap();
        }
        let mut config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        edit(&mut config);
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        dir
    }

    /// `logits` on a model whose config has `key` set to `value`.
    fn config_case(&mut self, key: &str, value: Value, says: &[&str]) {
        let name = format!(
            "config-{key}-{}",
            value.to_string().replace(['"', '.', '-'], "_")
        );
        let model = self.model_copy(&name, |c| match value {
            Value::Null if key.starts_with('-') => {
                c.as_object_mut().unwrap().remove(&key[1..]);
            }
            v => c[key] = v,
        });
        let ids = self.write("ids.jsonl", "{\"ids\": [1, 2, 3]}\n");
        let model = model.display().to_string();
        self.case(
            &name,
            &["logits", "--model", &model, "--ids", &ids],
            1,
            says,
        );
    }

    /// `logits` on a model whose `file` is replaced by `bytes`.
    fn model_file_case(&mut self, name: &str, file: &str, bytes: &[u8], says: &[&str]) {
        let model = self.model_copy(name, |_| {});
        std::fs::write(model.join(file), bytes).unwrap();
        let ids = self.write("ids.jsonl", "{\"ids\": [1, 2, 3]}\n");
        let model = model.display().to_string();
        self.case(name, &["logits", "--model", &model, "--ids", &ids], 1, says);
    }

    /// `predict` on a model whose tokenizer.json is replaced by `bytes`.
    fn tokenizer_case(&mut self, name: &str, bytes: &[u8], says: &[&str]) {
        let model = self.model_copy(name, |_| {});
        std::fs::write(model.join("tokenizer.json"), bytes).unwrap();
        let (model, test) = (
            model.display().to_string(),
            self.sample.display().to_string(),
        );
        let out = self.path(&format!("{name}.csv")).display().to_string();
        self.case(
            name,
            &["predict", "--model", &model, "--test", &test, "--out", &out],
            1,
            says,
        );
    }

    /// `eval` of a prediction file with `body` against the sample's labels.
    fn predictions_case(&mut self, name: &str, body: &str, says: &[&str]) {
        let preds = self.write(&format!("{name}.csv"), body);
        let labels = self.sample.display().to_string();
        self.case(
            name,
            &["eval", "--preds", &preds, "--labels", &labels],
            1,
            says,
        );
    }

    /// A command line refused by a flag's own check (clap's exit code 2).
    fn flag_case(&mut self, args: &[&str], says: &[&str]) {
        let name = format!("flag {}", args.join(" "));
        self.case(&name, args, 2, says);
    }
}

/// The sample's first `n` ids with uniform probabilities, as a prediction file.
fn uniform_predictions(sample: &Path, n: usize) -> String {
    let mut reader = csv::Reader::from_path(sample).unwrap();
    let mut out = String::from("id,winner_model_a,winner_model_b,winner_tie\n");
    for r in reader.records().take(n) {
        out += &format!("{},0.3,0.3,0.4\n", &r.unwrap()[0]);
    }
    out
}

fn csv_cases(c: &mut Corpus) {
    let r1 = row(1);
    c.csv_case(
        "csv-short-row",
        &format!("{r1}\n2,m1,m2"),
        &["row 2", "fields where the header has 9"],
    );
    c.csv_case(
        "csv-extra-field",
        &format!("{r1},x"),
        &["row 1", "10 fields where the header has 9"],
    );
    c.csv_case(
        "csv-empty-id",
        &row(1).replacen('1', "", 1),
        &["row 1", "empty id"],
    );
    c.csv_case(
        "csv-repeated-id",
        &format!("{r1}\n{}\n{r1}", row(2)),
        &["row 3", "id 1 repeats row 1"],
    );
    c.csv_case(
        "csv-label-two",
        &r1.replace(",1,0,0", ",2,0,0"),
        &["row 1", "winner_model_a", "must be 0 or 1"],
    );
    c.csv_case(
        "csv-label-text",
        &r1.replace(",1,0,0", ",yes,0,0"),
        &["row 1", "must be 0 or 1"],
    );
    c.csv_case(
        "csv-label-nan",
        &r1.replace(",1,0,0", ",NaN,0,0"),
        &["row 1", "must be 0 or 1"],
    );
    c.csv_case(
        "csv-two-winners",
        &r1.replace(",1,0,0", ",1,1,0"),
        &["row 1", "not one-hot"],
    );
    c.csv_case(
        "csv-no-winner",
        &r1.replace(",1,0,0", ",0,0,0"),
        &["row 1", "not one-hot"],
    );
    c.csv_case(
        "csv-turn-counts",
        &r1.replace("\"[\"\"a\"\"]\"", "\"[\"\"a\"\",\"\"b\"\"]\""),
        &["row 1", "turn counts differ"],
    );
    c.csv_case(
        "csv-empty-prompt-list",
        &r1.replace("\"[\"\"q1\"\"]\"", "\"[]\""),
        &["row 1", "prompt has no turns"],
    );
    let quote_free = "3,m1,m2,[null],[null],[null],0,1,0";
    c.csv_case(
        "csv-unclosed-quote",
        &format!(
            "{r1}\n{}\n{quote_free}",
            row(2).replace(",m1,m2,", ",\"m1,m2,")
        ),
        &["fields where the header has 9"],
    );
    let labels_last = "id,prompt,response_a,response_b,model_a";
    let turns = "\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\"";
    let path = c.write(
        "csv-open-quote-to-eof.csv",
        format!("{labels_last}\n1,{turns},m1\n2,{turns},\"m2\n3,[null],[null],[null],m3\n"),
    );
    let out = c.path("open-quote.csv").display().to_string();
    let model = c.model.display().to_string();
    c.case(
        "csv-open-quote-to-eof",
        &["predict", "--model", &model, "--test", &path, "--out", &out],
        1,
        &["csv-open-quote-to-eof.csv", "a quote is never closed"],
    );
    c.raw_csv_case(
        "csv-column-twice",
        format!("{}\n{r1}\n", HEADER.replace("model_b", "id")),
        &["names column 'id' twice"],
    );
    c.raw_csv_case(
        "csv-missing-column",
        format!("{}\n", HEADER.replace("response_b", "resp_b")),
        &["missing column 'response_b'"],
    );
    c.raw_csv_case(
        "csv-partial-labels",
        format!("{}\n", HEADER.replace(",winner_tie", "")),
        &["not all of winner_model_a"],
    );
    c.raw_csv_case("csv-empty", "", &["empty file"]);
    let mut utf16 = vec![0xff, 0xfe];
    for unit in format!("{HEADER}\n{r1}\n").encode_utf16() {
        utf16.extend_from_slice(&unit.to_le_bytes());
    }
    c.raw_csv_case("csv-utf16", utf16, &["UTF-16", "save it as UTF-8"]);
    let mut latin1 = format!("{HEADER}\n").into_bytes();
    latin1.extend_from_slice(row(1).replace("\"\"a\"\"", "\"\"caf\u{e9}\"\"").as_bytes());
    let at = latin1.len() - 15;
    latin1.splice(at..at + 2, [0xe9]);
    c.raw_csv_case("csv-latin1", latin1, &["row 1", "not valid UTF-8"]);
    c.case(
        "csv-missing-file",
        &["baseline", "cv", "--train", "/nonexistent/train.csv"],
        1,
        &["cannot open /nonexistent/train.csv"],
    );
    let unlabelled =
        "id,prompt,response_a,response_b\n1,\"[\"\"p\"\"]\",\"[\"\"a\"\"]\",\"[\"\"b\"\"]\"\n";
    c.raw_csv_case("csv-unlabelled", unlabelled, &["no label"]);
    let few = c.write(
        "csv-too-few-prompts.csv",
        format!("{HEADER}\n{r1}\n{}\n", row(2)),
    );
    c.case(
        "csv-more-folds-than-prompts",
        &["baseline", "cv", "--train", &few, "--folds", "5"],
        1,
        &["--folds", "distinct prompts (2)"],
    );
}

fn json_turn_cases(c: &mut Corpus) {
    let r1 = row(1);
    let with_prompt = |p: &str| r1.replace("\"[\"\"q1\"\"]\"", p);
    c.csv_case(
        "json-not-a-list",
        &with_prompt("\"{\"\"a\"\": 1}\""),
        &["row 1", "'prompt' is not a JSON list"],
    );
    c.csv_case(
        "json-number-in-list",
        &with_prompt("\"[1]\""),
        &["row 1", "'prompt' is not a JSON list"],
    );
    c.csv_case(
        "json-nested-list",
        &with_prompt("\"[[\"\"q\"\"]]\""),
        &["row 1", "'prompt' is not a JSON list"],
    );
    c.csv_case(
        "json-unterminated-list",
        &with_prompt("\"[\"\"q\"\"\""),
        &["row 1", "'prompt' is not a JSON list"],
    );
    c.csv_case(
        "json-bare-string",
        &with_prompt("\"\"\"q\"\"\""),
        &["row 1", "'prompt' is not a JSON list"],
    );
    c.csv_case(
        "json-trailing-garbage",
        &with_prompt("\"[\"\"q\"\"] x\""),
        &["row 1", "'prompt' is not a JSON list"],
    );
    c.csv_case(
        "json-bad-escape",
        &with_prompt("\"[\"\"\\q\"\"]\""),
        &["row 1", "'prompt' is not a JSON list"],
    );
    c.csv_case(
        "json-empty-field",
        &with_prompt(""),
        &["row 1", "'prompt' is not a JSON list"],
    );
    c.csv_case(
        "json-response-object",
        &r1.replace("\"[\"\"a\"\"]\"", "\"{}\""),
        &["row 1", "'response_a' is not a JSON list"],
    );
    c.csv_case(
        "json-response-bool",
        &r1.replace("\"[\"\"bb\"\"]\"", "\"[true]\""),
        &["row 1", "'response_b' is not a JSON list"],
    );
}

fn config_cases(c: &mut Corpus) {
    let says = |setting: &'static str| -> Vec<&'static str> { vec!["config.json", setting] };
    c.config_case("sliding_window", json!(0), &says("sliding_window is 0"));
    c.config_case("rms_norm_eps", json!(-1.0), &says("rms_norm_eps -1"));
    c.config_case("rms_norm_eps", json!("tiny"), &says("config.json"));
    c.config_case(
        "num_attention_heads",
        json!(0),
        &says("num_attention_heads is 0"),
    );
    c.config_case(
        "num_key_value_heads",
        json!(3),
        &says("not a multiple of num_key_value_heads 3"),
    );
    c.config_case(
        "num_key_value_heads",
        json!(0),
        &says("num_key_value_heads 0"),
    );
    c.config_case("head_dim", json!(7), &says("head_dim 7"));
    c.config_case("head_dim", json!(0), &says("head_dim 0"));
    c.config_case("hidden_size", json!(0), &says("hidden_size is 0"));
    c.config_case(
        "intermediate_size",
        json!(0),
        &says("intermediate_size is 0"),
    );
    c.config_case("vocab_size", json!(0), &says("vocab_size is 0"));
    c.config_case(
        "num_hidden_layers",
        json!(1_000_000_000u64),
        &says("num_hidden_layers is 1000000000, but the checkpoint holds 2 layers"),
    );
    c.config_case(
        "num_hidden_layers",
        json!(0),
        &says("num_hidden_layers is 0"),
    );
    c.config_case("num_hidden_layers", json!(-3), &says("config.json"));
    c.config_case(
        "attn_logit_softcapping",
        json!(0.0),
        &says("attn_logit_softcapping 0"),
    );
    c.config_case(
        "final_logit_softcapping",
        json!(-30.0),
        &says("final_logit_softcapping -30"),
    );
    c.config_case(
        "query_pre_attn_scalar",
        json!(0.0),
        &says("query_pre_attn_scalar 0"),
    );
    c.config_case(
        "hidden_activation",
        json!("relu"),
        &says("hidden_activation \"relu\" is not supported"),
    );
    c.config_case(
        "architectures",
        json!(["BertModel"]),
        &says("unknown architecture \"BertModel\""),
    );
    c.config_case(
        "architectures",
        json!([]),
        &says("no `architectures` entry"),
    );
    c.config_case(
        "model_type",
        json!("llama"),
        &says("model_type \"llama\" does not match"),
    );
    c.config_case(
        "attention_bias",
        json!(true),
        &says("`attention_bias: true` is not supported"),
    );
    c.config_case("-hidden_size", Value::Null, &says("missing `hidden_size`"));
    c.config_case("-vocab_size", Value::Null, &says("missing `vocab_size`"));
    c.config_case(
        "rope_parameters",
        json!({"rope_type": "yarn", "factor": 2.0}),
        &says("rope type \"yarn\" is not supported"),
    );
    c.config_case(
        "rope_parameters",
        json!({"rope_theta": -1.0, "rope_type": "default"}),
        &says("rope_theta -1"),
    );
    c.config_case(
        "layer_types",
        json!(["sliding_attention"]),
        &says("layer_types has 1 entries for 2 layers"),
    );
    c.config_case(
        "layer_types",
        json!(["chunked_attention", "full_attention"]),
        &says("layer type \"chunked_attention\" is not supported"),
    );
    c.config_case(
        "pad_token_id",
        json!(-2),
        &says("pad_token_id -2 is negative"),
    );
    c.model_file_case(
        "config-not-json",
        "config.json",
        b"{\"architectures\": [",
        &["config.json"],
    );
}

fn safetensors_cases(c: &mut Corpus) {
    let good = std::fs::read(c.model.join("model.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&good[8..8 + header_len]).unwrap();
    let with_header = |edit: &dyn Fn(&mut Value)| {
        let mut h = header.clone();
        edit(&mut h);
        let text = h.to_string();
        let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        bytes.extend_from_slice(&good[8 + header_len..]);
        bytes
    };
    let embed = "model.embed_tokens.weight";
    c.model_file_case(
        "st-truncated-data",
        "model.safetensors",
        &good[..good.len() - 100],
        &["model.safetensors"],
    );
    c.model_file_case(
        "st-truncated-header",
        "model.safetensors",
        &good[..20],
        &["model.safetensors"],
    );
    c.model_file_case("st-empty", "model.safetensors", b"", &["model.safetensors"]);
    c.model_file_case(
        "st-huge-header-length",
        "model.safetensors",
        &u64::MAX.to_le_bytes(),
        &["model.safetensors"],
    );
    c.model_file_case(
        "st-header-not-json",
        "model.safetensors",
        &[&8u64.to_le_bytes()[..], b"not json"].concat(),
        &["model.safetensors"],
    );
    // A valid file without the embedding: the other tensors' bytes, offsets renumbered.
    let data = &good[8 + header_len..];
    let mut kept = serde_json::Map::new();
    let mut bytes = Vec::new();
    for (name, info) in header.as_object().unwrap() {
        if name == embed || name == "__metadata__" {
            continue;
        }
        let [a, b] = [0, 1].map(|k| info["data_offsets"][k].as_u64().unwrap() as usize);
        let mut info = info.clone();
        info["data_offsets"] = json!([bytes.len(), bytes.len() + b - a]);
        bytes.extend_from_slice(&data[a..b]);
        kept.insert(name.clone(), info);
    }
    let text = Value::Object(kept).to_string();
    let missing = [
        &(text.len() as u64).to_le_bytes()[..],
        text.as_bytes(),
        &bytes,
    ]
    .concat();
    c.model_file_case("st-missing-tensor", "model.safetensors", &missing, &[embed]);
    let reshaped = with_header(&|h| {
        let s = h[embed]["shape"].as_array().unwrap().clone();
        h[embed]["shape"] = json!([s[1], s[0]]);
    });
    c.model_file_case(
        "st-mis-shaped-tensor",
        "model.safetensors",
        &reshaped,
        &[embed],
    );
    let int = with_header(&|h| h[embed]["dtype"] = json!("I32"));
    c.model_file_case("st-integer-dtype", "model.safetensors", &int, &[embed]);
    let outside = with_header(&|h| h[embed]["data_offsets"] = json!([0, 1u64 << 40]));
    c.model_file_case(
        "st-offsets-past-the-end",
        "model.safetensors",
        &outside,
        &["model.safetensors", "not a valid safetensors file"],
    );
    let mut nan = good.clone();
    let start = 8 + header_len + header[embed]["data_offsets"][0].as_u64().unwrap() as usize;
    nan[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    c.model_file_case(
        "st-nan-weight",
        "model.safetensors",
        &nan,
        &[embed, "element 0 is NaN"],
    );
}

fn tokenizer_cases(c: &mut Corpus) {
    c.tokenizer_case("tok-not-json", b"{\"model\": ", &["tokenizer.json"]);
    c.tokenizer_case("tok-empty", b"", &["tokenizer.json"]);
    c.tokenizer_case("tok-wrong-shape", b"{\"model\": 3}", &["tokenizer.json"]);
    // A tokenizer whose ids reach past this model's 256-entry vocabulary.
    let mut big = verdict::data::format::byte_level_tokenizer_json();
    let vocab = big["model"]["vocab"].as_object_mut().unwrap();
    for (i, (_, id)) in vocab.iter_mut().enumerate() {
        *id = json!(1000 + i);
    }
    c.tokenizer_case(
        "tok-wrong-vocabulary",
        big.to_string().as_bytes(),
        &["vocabulary has 256 entries", "wrong tokenizer.json"],
    );
    let model = c.model_copy("tok-missing", |_| {});
    std::fs::remove_file(model.join("tokenizer.json")).unwrap();
    let (model, test) = (model.display().to_string(), c.sample.display().to_string());
    let out = c.path("tok-missing.csv").display().to_string();
    c.case(
        "tok-missing",
        &["predict", "--model", &model, "--test", &test, "--out", &out],
        1,
        &["tokenizer.json"],
    );
}

fn adapter_cases(c: &mut Corpus) {
    let good = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/gemma2_seqcls");
    let ids = c.write("ids.jsonl", "{\"ids\": [1, 2, 3]}\n");
    let adapter_case = |c: &mut Corpus,
                        name: &str,
                        config: Option<Value>,
                        weights: Option<&[u8]>,
                        says: &[&str]| {
        let dir = c.path(name);
        std::fs::create_dir_all(&dir).unwrap();
        let src = good.join("adapter");
        match config {
            Some(v) => std::fs::write(dir.join("adapter_config.json"), v.to_string()).unwrap(),
            None => drop(
                std::fs::copy(
                    src.join("adapter_config.json"),
                    dir.join("adapter_config.json"),
                )
                .unwrap(),
            ),
        }
        match weights {
            Some(b) => std::fs::write(dir.join("adapter_model.safetensors"), b).unwrap(),
            None => drop(
                std::fs::copy(
                    src.join("adapter_model.safetensors"),
                    dir.join("adapter_model.safetensors"),
                )
                .unwrap(),
            ),
        }
        let (model, adapter) = (good.display().to_string(), dir.display().to_string());
        c.case(
            name,
            &[
                "logits",
                "--model",
                &model,
                "--adapter",
                &adapter,
                "--ids",
                &ids,
            ],
            1,
            says,
        );
    };
    let config: Value =
        serde_json::from_slice(&std::fs::read(good.join("adapter/adapter_config.json")).unwrap())
            .unwrap();
    let edited = |key: &str, v: Value| {
        let mut c = config.clone();
        c[key] = v;
        Some(c)
    };
    adapter_case(
        c,
        "adapter-rank-mismatch",
        edited("r", json!(3)),
        None,
        &["adapter"],
    );
    adapter_case(
        c,
        "adapter-peft-type",
        edited("peft_type", json!("IA3")),
        None,
        &["peft_type \"IA3\""],
    );
    adapter_case(
        c,
        "adapter-unknown-target",
        edited("target_modules", json!(["qkv_proj"])),
        None,
        &["target_modules does not list q_proj"],
    );
    adapter_case(
        c,
        "adapter-dora",
        edited("use_dora", json!(true)),
        None,
        &["use_dora"],
    );
    adapter_case(
        c,
        "adapter-weights-truncated",
        None,
        Some(b"\x10\x00\x00\x00\x00\x00\x00\x00{}"),
        &["adapter_model.safetensors"],
    );
    adapter_case(
        c,
        "adapter-weights-empty",
        None,
        Some(b""),
        &["adapter_model.safetensors"],
    );
    let dir = c.path("adapter-no-config");
    std::fs::create_dir_all(&dir).unwrap();
    let (model, adapter) = (good.display().to_string(), dir.display().to_string());
    c.case(
        "adapter-no-config",
        &[
            "logits",
            "--model",
            &model,
            "--adapter",
            &adapter,
            "--ids",
            &ids,
        ],
        1,
        &["adapter_config.json"],
    );
}

fn run_folder_cases(c: &mut Corpus) {
    let empty = c.path("run-empty");
    std::fs::create_dir_all(&empty).unwrap();
    let empty = empty.display().to_string();
    c.case(
        "resume-without-a-run",
        &["train", "--resume", &empty],
        1,
        &["train_config.json"],
    );
    let broken = c.path("run-broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("train_config.json"), "{\"lr\": ").unwrap();
    let broken = broken.display().to_string();
    c.case(
        "resume-broken-config",
        &["train", "--resume", &broken],
        1,
        &["train_config.json"],
    );
    let afile = c.write("a-file", "x");
    let (model, sample) = (
        c.model.display().to_string(),
        c.sample.display().to_string(),
    );
    c.case(
        "train-out-is-a-file",
        &[
            "train", "--model", &model, "--train", &sample, "--out", &afile,
        ],
        1,
        &["--out", "is a file, but this output is a folder"],
    );
    let under = format!("{afile}/p.csv");
    c.case(
        "predict-out-under-a-file",
        &[
            "predict", "--model", &model, "--test", &sample, "--out", &under,
        ],
        1,
        &["--out", "is a file, so the file cannot be created"],
    );
    c.case(
        "demo-out-is-a-file",
        &["demo", "--out", &afile],
        1,
        &["--out", "is a file"],
    );
    let ids = c.write("ids.jsonl", "{\"ids\": [1, 2, 3]}\n");
    c.case(
        "model-folder-missing",
        &["logits", "--model", "/nonexistent/model", "--ids", &ids],
        1,
        &["/nonexistent/model"],
    );
    c.case(
        "ids-not-json",
        &["logits", "--model", &model, "--ids", &afile],
        1,
        &["a-file:1", "not JSON"],
    );
}

fn prediction_file_cases(c: &mut Corpus) {
    let good = uniform_predictions(&c.sample, 30);
    let header = "id,winner_model_a,winner_model_b,winner_tie";
    c.predictions_case(
        "preds-unknown-id",
        &format!("{header}\n12345,0.3,0.3,0.4\n"),
        &["id 12345 is not in"],
    );
    c.predictions_case(
        "preds-missing-column",
        &good.replace(",winner_tie", ",tie"),
        &["winner_tie"],
    );
    c.predictions_case(
        "preds-nan",
        &good.replacen("0.3,0.3,0.4", "NaN,0.3,0.4", 1),
        &["preds-nan.csv"],
    );
    c.predictions_case(
        "preds-negative",
        &good.replacen("0.3,0.3,0.4", "-0.3,0.9,0.4", 1),
        &["preds-negative.csv"],
    );
    c.predictions_case(
        "preds-text",
        &good.replacen("0.3,0.3,0.4", "high,0.3,0.4", 1),
        &["preds-text.csv"],
    );
    c.predictions_case(
        "preds-short-row",
        &good.replacen(",0.3,0.3,0.4", ",0.3", 1),
        &["preds-short-row.csv"],
    );
    let first = good.lines().nth(1).unwrap();
    c.predictions_case(
        "preds-repeated-id",
        &format!("{good}{first}\n"),
        &["preds-repeated-id.csv"],
    );
    c.predictions_case("preds-empty", "", &["preds-empty.csv"]);
    c.predictions_case(
        "preds-header-only",
        &format!("{header}\n"),
        &["preds-header-only.csv"],
    );
    let preds = c.write("ensemble-member.csv", &good);
    let other = c.write("ensemble-other.csv", uniform_predictions(&c.sample, 10));
    let (labels, out) = (
        c.sample.display().to_string(),
        c.path("ens.json").display().to_string(),
    );
    c.case(
        "ensemble-members-disagree",
        &[
            "ensemble", "--preds", &preds, &other, "--labels", &labels, "--out", &out,
        ],
        1,
        &["ensemble-other.csv"],
    );
    let out = c.path("cal.json").display().to_string();
    let bad = c.write(
        "calibrate-nan.csv",
        good.replacen("0.3,0.3,0.4", "NaN,0.3,0.4", 1),
    );
    c.case(
        "calibrate-nan-input",
        &[
            "calibrate",
            "--preds",
            &bad,
            "--labels",
            &labels,
            "--out",
            &out,
        ],
        1,
        &["calibrate-nan.csv"],
    );
}

fn flag_cases(c: &mut Corpus) {
    let (model, sample) = (
        c.model.display().to_string(),
        c.sample.display().to_string(),
    );
    let out = c.path("flag-out").display().to_string();
    let train = [
        "train", "--model", &model, "--train", &sample, "--out", &out,
    ];
    for (flag, value, says) in [
        ("--lr", "-1", "must be > 0"),
        ("--lr", "0", "must be > 0"),
        ("--lr", "inf", "not a finite number"),
        ("--lr", "nan", "not a finite number"),
        ("--lr", "fast", "not a number"),
        ("--head-lr", "-0.1", "must be > 0"),
        ("--weight-decay", "-1", "must be >= 0"),
        ("--lora-r", "0", "whole number >= 1"),
        ("--lora-r", "-4", "whole number >= 1"),
        ("--lora-r", "2.5", "not a whole number"),
        ("--lora-alpha", "0", "must be > 0"),
        ("--lora-dropout", "1", "in [0, 1)"),
        ("--lora-dropout", "-0.1", "in [0, 1)"),
        ("--label-smoothing", "1.5", "in [0, 1)"),
        ("--aux-weight", "-1", "must be >= 0"),
        ("--warmup-ratio", "2", "in [0, 1]"),
        ("--warmup-steps", "-1", "whole number >= 0"),
        ("--batch-tokens", "0", "whole number >= 1"),
        ("--grad-accum", "0", "whole number >= 1"),
        ("--epochs", "0", "whole number >= 1"),
        ("--max-steps", "0", "whole number >= 1"),
        ("--clip", "-1", "must be >= 0"),
        ("--max-len", "0", "whole number >= 1"),
        ("--eval-every", "0", "whole number >= 1"),
        ("--save-every", "-5", "whole number >= 0"),
    ] {
        let mut args = train.to_vec();
        args.extend([flag, value]);
        c.flag_case(&args, &[flag, says]);
    }
    let predict = [
        "predict", "--model", &model, "--test", &sample, "--out", &out,
    ];
    for (flag, value, says) in [
        ("--batch-tokens", "0", "whole number >= 1"),
        ("--max-len", "-1", "whole number >= 1"),
        ("--tta", "sometimes", "sometimes"),
        ("--device", "gpu7", "gpu7"),
    ] {
        let mut args = predict.to_vec();
        args.extend([flag, value]);
        c.flag_case(&args, &[flag, says]);
    }
    for (flag, value, says) in [
        ("--smoothing", "-1", "must be > 0"),
        ("--smoothing", "nan", "not a finite number"),
        ("--folds", "0", "whole number >= 1"),
        ("--buckets", "0", "positive number or 'auto'"),
        ("--feature", "bytes", "bytes"),
    ] {
        c.flag_case(
            &["baseline", "cv", "--train", &sample, flag, value],
            &[flag, says],
        );
    }
    c.flag_case(
        &["bench", "kernels", "--ms-per-case", "-1"],
        &["--ms-per-case", "must be > 0"],
    );
    c.flag_case(
        &["init", "--arch", "gpt2", "--preset", "tiny", "--out", &out],
        &["--arch", "gpt2"],
    );
}

#[test]
fn every_bad_input_is_refused_with_a_message_that_names_it() {
    let mut c = Corpus::new();
    csv_cases(&mut c);
    json_turn_cases(&mut c);
    config_cases(&mut c);
    safetensors_cases(&mut c);
    tokenizer_cases(&mut c);
    adapter_cases(&mut c);
    run_folder_cases(&mut c);
    prediction_file_cases(&mut c);
    flag_cases(&mut c);
    assert!(
        c.cases.len() >= 100,
        "the corpus has {} cases",
        c.cases.len()
    );

    let mut failures = Vec::new();
    for case in &c.cases {
        let out = common::verdict(&case.args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let missing: Vec<&String> = case
            .says
            .iter()
            .filter(|s| !stderr.contains(s.as_str()))
            .collect();
        if out.status.code() != Some(case.code) || !missing.is_empty() {
            failures.push(format!(
                "{}: exit {:?} (want {}), missing {missing:?}\n    {}",
                case.name,
                out.status.code(),
                case.code,
                stderr.trim().replace('\n', "\n    ")
            ));
        }
    }
    println!(
        "{} bad inputs, {} refused as expected",
        c.cases.len(),
        c.cases.len() - failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        c.cases.len(),
        failures.join("\n")
    );
}
