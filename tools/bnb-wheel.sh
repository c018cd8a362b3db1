#!/usr/bin/env bash
# Downloads the bitsandbytes wheel that tools/bench_torch.py's NF4 rows need on the GPU machine
# (its image has torch and transformers but not bitsandbytes, and cannot reach PyPI) and trims
# it to fit one device call, which carries at most 64 MiB: the release binary (~33 MB) and the
# tree (~10 MB) leave ~20 MB, and the full wheel is 43 MB, mostly native libraries for CUDA
# 11.8 to 13.2 and ROCm. The lent machines run CUDA 13 drivers with a CUDA 12.8+ or 13.x
# PyTorch; bitsandbytes picks the packaged library of torch's CUDA major with the highest minor
# not above torch's (bitsandbytes/cextension.py), so the 12.8 and 13.0 libraries serve every
# such torch: the trimmed wheel is ~10 MB. RECORD is rewritten so pip installs it unchanged.
#
#   bash tools/bnb-wheel.sh          # writes .whl/bitsandbytes-<version>-...whl
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.50.2
keep="cuda128 cuda130"
download=$(mktemp -d)
trap 'rm -rf "$download"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 -d "$download" "bitsandbytes==$version" >&2
mkdir -p .whl
rm -f .whl/bitsandbytes-*.whl
python3 - "$download"/bitsandbytes-"$version"-*.whl .whl "$keep" <<'PY'
import base64, hashlib, os, re, sys, zipfile

source, out_dir, keep = sys.argv[1], sys.argv[2], sys.argv[3].split()
target = os.path.join(out_dir, os.path.basename(source))
native = re.compile(r"bitsandbytes/libbitsandbytes_(\w+)\.so$")
kept, dropped = [], []
with zipfile.ZipFile(source) as whl, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
    record_name = next(n for n in whl.namelist() if n.endswith(".dist-info/RECORD"))
    record = []
    for info in whl.infolist():
        match = native.search(info.filename)
        if match and match.group(1) not in keep:
            dropped.append(match.group(1))
            continue
        if match:
            kept.append(match.group(1))
        if info.filename == record_name:
            continue
        data = whl.read(info)
        out.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{info.filename},sha256={digest},{len(data)}")
    record.append(f"{record_name},,")
    out.writestr(record_name, "\n".join(record) + "\n")
missing = sorted(set(keep) - set(kept))
if missing:
    sys.exit(f"{source}: no library for {', '.join(missing)}; the pins in tools/bnb-wheel.sh are stale")
print(f"kept {', '.join(sorted(kept))}; dropped {', '.join(sorted(dropped))}", file=sys.stderr)
print(f"{target}: {os.path.getsize(target) / 1e6:.1f} MB (from {os.path.getsize(source) / 1e6:.1f} MB)",
      file=sys.stderr)
PY
