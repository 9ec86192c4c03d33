#!/bin/sh
# Regenerates the committed torch.save fixtures in test/fixtures/formats/torch-<version>/ (read by
# test/formats/fixtures.test.ts and used as fuzz seeds, so those tests need no PyTorch).
#   scripts/formats/make-fixtures.sh /usr/bin/python3 1.13
#   scripts/formats/make-fixtures.sh /tmp/torch2/bin/python 2.x
set -eu
python=$1
label=$2
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/test/fixtures/formats/torch-$label"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" "$root/test/fixtures/formats/torch_interop.py" make "$tmp"
mkdir -p "$out"
for name in asgd.pt model.pt checkpoint.pt tensors.pt; do cp "$tmp/$name" "$out/$name"; done
"$python" - "$tmp/manifest.json" "$out/manifest.json" <<'PY'
import json, sys
manifest = json.load(open(sys.argv[1]))
keep = ["asgd.pt", "model.pt", "checkpoint.pt", "tensors.pt"]
json.dump({'torch': manifest['torch'], 'files': {k: manifest['files'][k] for k in keep}}, open(sys.argv[2], 'w'))
PY
# Values weights_only reads besides tensors: Parameters with attributes, dtypes, devices, layouts, complex.
"$python" "$root/test/fixtures/formats/weights_only_values.py" "$out"
echo "wrote $out"
