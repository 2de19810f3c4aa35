#!/usr/bin/env bash
# The main job end to end on the built-in default: a tiny ChatGLM3 checkpoint, the sample data in data/,
# LoRA training under the deepspeed launcher (on the CPU when there is no GPU), then batch prediction with metrics.
#   bash demo.sh            (MODE=glm, MODE=glm2 or MODE=glm4 bash demo.sh for the other versions)
set -euo pipefail
cd "$(dirname "$0")"
MODE="${MODE:-glm3}"
WORK="${WORK:-demo-$MODE}"
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu  # DeepSpeed's CPU accelerator and the gloo backend
fi
# Start afresh, but delete only what an earlier demo wrote: a WORK holding anything else is the user's, and stays.
if [ -e "$WORK" ] && [ ! -d "$WORK" ]; then
  echo "demo.sh: WORK=$WORK is a file; choose a directory" >&2
  exit 2
elif [ -e "$WORK" ]; then
  for entry in "$WORK"/* "$WORK"/.[!.]*; do
    case "$(basename "$entry")" in
      base|output|predictions.jsonl|predictions.metrics.json|'*'|'.[!.]*') ;;
      *) echo "demo.sh: WORK=$WORK holds $(basename "$entry"), which the demo did not write; choose another WORK" >&2
         exit 2 ;;
    esac
  done
  rm -rf "$WORK"
fi
python -m model.tiny --mode "$MODE" --output_dir "$WORK/base"
deepspeed --num_gpus 1 train.py --mode "$MODE" --model_name_or_path "$WORK/base" --train_type lora \
  --lora_dim 8 --lora_alpha 32 --lora_module_name "query_key_value,dense_h_to_4h,dense_4h_to_h,dense" \
  --train_path data/train.jsonl --dev_path data/dev.jsonl --max_len 256 --max_src_len 200 \
  --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --learning_rate 1e-2 --num_train_epochs 3 \
  --show_loss_step 6 --sample_prompts data/test.jsonl --max_new_tokens 32 --output_dir "$WORK/output"
# the newest checkpoint: the highest step (train.last_checkpoint, the one --resume picks)
CHECKPOINT="$WORK/output/$(python -c 'import sys, train; print(train.last_checkpoint(sys.argv[1]))' "$WORK/output")"
python predict.py --mode "$MODE" --model_path "$CHECKPOINT" --test_path data/test.jsonl \
  --output_path "$WORK/predictions.jsonl" --max_new_tokens 48 --batch_size 6
echo "checkpoint:  $CHECKPOINT"
echo "predictions: $WORK/predictions.jsonl"
echo "loss plot:   $WORK/output/loss.png"
echo "samples:     $WORK/output/samples.jsonl (answers to data/test.jsonl at each evaluation)"
