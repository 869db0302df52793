#!/usr/bin/env bash
# Rebuilds the demo model shipped in src/llama3med/demo_model from nothing, on a CPU, in about half an
# hour: phantom data, the tower stage and both training stages, a score on a fresh-seed test set, then
# the export.
# Run from the repository root.
set -euo pipefail
RUNS=${RUNS:-runs/demo}

llama3med data phantoms --out "$RUNS/data/train" --n 3000 --seed 0 --size 384 --format png
llama3med train recipes/demo/tower.yaml --set output_dir="$RUNS/tower" \
    --set data.0.path="$RUNS/data/train/captions.json" --set data.0.image_root="$RUNS/data/train/images"
llama3med train recipes/demo/pretrain.yaml --set model="$RUNS/tower" --set output_dir="$RUNS/pretrain" \
    --set data.0.path="$RUNS/data/train/captions.json" --set data.0.image_root="$RUNS/data/train/images"
llama3med train recipes/demo/finetune.yaml --set model="$RUNS/pretrain" --set output_dir="$RUNS/finetune" \
    --set data.0.path="$RUNS/data/train/conversations.json" --set data.0.image_root="$RUNS/data/train/images"

# A test set the model never saw (another seed), in DICOM as users will ask about it.
llama3med data phantoms --out "$RUNS/data/test" --n 300 --seed 1000 --size 384 --format dcm
llama3med eval --model "$RUNS/finetune" --benchmark llava-med --data "$RUNS/data/test/test.json" --out "$RUNS/eval"

# Export the final model into the package (weights, tokenizer, processor; no optimizer state).
python -c "from llama3med.checkpoints import DEMO_MODEL_DIR, load, save; save(*load('$RUNS/finetune', dtype='float32'), DEMO_MODEL_DIR)"
