#!/usr/bin/env bash
# The quickstart flow in the shell: create, add, train, search, delete, retrain, export.
# Usage: bash examples/cli_walkthrough.sh [N]   (needs rvqstore installed; uses python -m rvqstore)
set -euo pipefail
N=${1:-3000}
RVQ="${PYTHON:-python3} -m rvqstore"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# generated clustered vectors with keys, as JSON lines
"${PYTHON:-python3}" - "$N" <<'PY'
import json, sys
import numpy as np
n = int(sys.argv[1])
rng = np.random.default_rng(0)
centers = rng.standard_normal((20, 16))
x = centers[rng.integers(20, size=n)] + 0.3 * rng.standard_normal((n, 16))
with open("docs.jsonl", "w") as f:
    for i, v in enumerate(x.round(4).tolist()):
        f.write(json.dumps({"key": f"doc-{i}", "vector": v}) + "\n")
PY

$RVQ create vecs.db --dim 16 --stages 8 --codebook-size 64
$RVQ add vecs.db docs.jsonl --train --quiet
$RVQ search vecs.db --key doc-7 -k 5
$RVQ delete vecs.db --key doc-7
$RVQ retrain vecs.db --quiet
$RVQ search vecs.db --key doc-8 -k 3 --exclude-self --json
$RVQ export vecs.db -o backup.jsonl
echo "exported $(wc -l < backup.jsonl) vectors"
$RVQ info vecs.db
