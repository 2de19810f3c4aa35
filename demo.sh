#!/usr/bin/env bash
# The main job end to end on the built-in default: a tiny ChatGLM3 checkpoint, the sample data in data/,
# LoRA training under the deepspeed launcher (on the CPU when there is no GPU), then batch prediction with metrics.
#   bash demo.sh            (MODE=glm, MODE=glm2, MODE=glm4 or MODE=glm4-0414 bash demo.sh for the other versions;
#                            glm4-0414: transformers' Glm4ForCausalLM with GLM-Z1's chat template)
#   MODE=glm4 TASK=tools bash demo.sh   the tool-calling fine-tune (glm3 or glm4) on data/tools_train.jsonl, predicted
#                                       on data/tools_test.jsonl (the set data/make_tools.py writes)
#   STAGE=dpo bash demo.sh              preference training (DPO; STAGE=orpo: ORPO) on the pairs in
#                                       data/pairs_train.jsonl (the set data/make_pairs.py writes)
set -euo pipefail
cd "$(dirname "$0")"
# an unsupported Python stops here with one line (python_check.py), not with a traceback further on
python -c "import python_check" || exit 2
MODE="${MODE:-glm3}"
TASK="${TASK:-chat}"
STAGE="${STAGE:-sft}"
case "$STAGE" in
  sft) ;;
  dpo|orpo) if [ "$TASK" != chat ]; then
              echo "demo.sh: STAGE=$STAGE runs on the chat pairs (data/pairs_train.jsonl): leave TASK out" >&2
              exit 2
            fi
            TASK=pairs ;;
  *)   echo "demo.sh: STAGE=$STAGE is not one of sft, dpo, orpo" >&2
       exit 2 ;;
esac
case "$TASK" in
  chat)  WORK="${WORK:-demo-$MODE}"
         DATA=(--train_path data/train.jsonl --dev_path data/dev.jsonl --max_len 256 --max_src_len 200)
         TEST=data/test.jsonl ;;
  pairs) WORK="${WORK:-demo-$MODE-$STAGE}"
         DATA=(--stage "$STAGE" --pref_beta 0.1 --train_path data/pairs_train.jsonl --dev_path data/pairs_dev.jsonl
               --max_len 256 --max_src_len 200)
         TEST=data/test.jsonl ;;
  tools) if [ "$MODE" != glm3 ] && [ "$MODE" != glm4 ] && [ "$MODE" != glm4-0414 ]; then
           echo "demo.sh: TASK=tools needs MODE=glm3, glm4 or glm4-0414 (ChatGLM-6B, ChatGLM2-6B have no tool calls)" >&2
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
# LoRA on attention and MLP: ChatGLM's module names; glm4-0414's default targets (q/k/v/o_proj, gate_up/down_proj)
LORA_MODULES=(--lora_module_name "query_key_value,dense_h_to_4h,dense_4h_to_h,dense")
if [ "$MODE" = glm4-0414 ]; then LORA_MODULES=(); fi
# a free port for the launcher's rendezvous (its default, 29500, may be taken by another run on this machine)
PORT="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
deepspeed --num_gpus 1 --master_port "$PORT" train.py --mode "$MODE" --model_name_or_path "$WORK/base" \
  --train_type lora --lora_dim 8 --lora_alpha 32 "${LORA_MODULES[@]}" \
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
