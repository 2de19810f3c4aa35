#!/usr/bin/env bash
# The main job end to end on the built-in default: a tiny ChatGLM3 checkpoint, the sample data in data/,
# LoRA training under the deepspeed launcher (on the CPU when there is no GPU), then batch prediction with metrics.
#   bash demo.sh            (MODE=glm, MODE=glm2 or MODE=glm4 bash demo.sh for the other versions)
#   MODE=glm4 TASK=tools bash demo.sh   the tool-calling fine-tune (glm3 or glm4) on data/tools_train.jsonl, predicted
#                                       on data/tools_test.jsonl (the set data/make_tools.py writes)
set -euo pipefail
cd "$(dirname "$0")"
# an unsupported Python stops here with one line (python_check.py), not with a traceback further on
python -c "import python_check" || exit 2
MODE="${MODE:-glm3}"
TASK="${TASK:-chat}"
case "$TASK" in
  chat)  WORK="${WORK:-demo-$MODE}"
         DATA=(--train_path data/train.jsonl --dev_path data/dev.jsonl --max_len 256 --max_src_len 200)
         TEST=data/test.jsonl ;;
  tools) if [ "$MODE" != glm3 ] && [ "$MODE" != glm4 ]; then
           echo "demo.sh: TASK=tools needs MODE=glm3 or MODE=glm4 (ChatGLM-6B and ChatGLM2-6B have no tool calls)" >&2
           exit 2
         fi
         WORK="${WORK:-demo-$MODE-tools}"
         # every sample's tools, calls and observations fit: truncation never cuts tools or calls
         DATA=(--train_path data/tools_train.jsonl --dev_path data/tools_test.jsonl --max_len 2048 --max_src_len 1984)
         TEST=data/tools_test.jsonl ;;
  *)     echo "demo.sh: TASK=$TASK is not one of chat, tools" >&2
         exit 2 ;;
esac
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
  "${DATA[@]}" \
  --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --learning_rate 1e-2 --num_train_epochs 3 \
  --show_loss_step 6 --sample_prompts "$TEST" --max_new_tokens 32 --output_dir "$WORK/output"
# the newest checkpoint: the highest step (train.last_checkpoint, the one --resume picks)
CHECKPOINT="$WORK/output/$(python -c 'import sys, train; print(train.last_checkpoint(sys.argv[1]))' "$WORK/output")"
python predict.py --mode "$MODE" --model_path "$CHECKPOINT" --test_path "$TEST" \
  --output_path "$WORK/predictions.jsonl" --max_new_tokens 48 --batch_size 6
echo "checkpoint:  $CHECKPOINT"
echo "predictions: $WORK/predictions.jsonl"
echo "chat page:   python web_demo.py --mode $MODE --model_path $CHECKPOINT   (then open the address it prints)"
echo "loss plot:   $WORK/output/loss.png"
echo "samples:     $WORK/output/samples.jsonl (answers to $TEST at each evaluation)"
