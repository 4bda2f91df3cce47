#!/usr/bin/env bash
# The README demo, all offline: install, start a local Hub-compatible server, run the CPU GRPO demo with the Hub
# upload on (consolidate the final FSDP2 checkpoint and push it), then load the model back from that server with
# `from_pretrained` and print a sample generation. Ends with the exact-answer accuracy on the val split before and
# after training, and where the training-curves PNG is (the same picture is on the model card).
#   bash scripts/demo.sh                                  # 30 GRPO steps (a few minutes on 2 cores)
#   bash scripts/demo.sh trainer.total_training_steps=4   # extra train_grpo.py overrides
#   DEMO_SKIP_INSTALL=1 bash scripts/demo.sh              # .venv already set up
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
[ "${DEMO_SKIP_INSTALL:-0}" = 1 ] || bash scripts/install.sh
PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run_dir="outputs/hub_demo/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$run_dir"
hub_root=$(mktemp -d -t demo-hub-XXXXXX)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$hub_root"
}
trap cleanup EXIT INT TERM

# A throwaway local token for the demo user; real runs put a write token from huggingface.co in HF_TOKEN.
export HF_TOKEN=hf_demo_local_write_token
"$PY" -m tests.hub_server --port 0 --root "$hub_root/data" --token "demo=$HF_TOKEN" >"$hub_root/url" \
  2>"$run_dir/hub_server.log" &
server_pid=$!
for _ in $(seq 100); do [ -s "$hub_root/url" ] && break; sleep 0.1; done
[ -s "$hub_root/url" ] || { echo "the local Hub server did not start; see $run_dir/hub_server.log" >&2; exit 1; }
export HF_ENDPOINT=$(head -n1 "$hub_root/url")
export HF_HUB_DISABLE_XET=1 HF_HUB_DISABLE_TELEMETRY=1 HF_HOME="$hub_root/hf_home"
echo "local Hub server at $HF_ENDPOINT (pid $server_pid)"

"$PY" train_grpo.py "hydra.run.dir=$run_dir/hydra" "trainer.default_local_dir=$run_dir/checkpoints" \
  hf_upload.enabled=true hf_upload.repo_id=demo/tiny-grpo-chain-sum hf_upload.private=true "$@" 2>&1 \
  | tee "$run_dir/train.log"

"$PY" scripts/demo_load_back.py --repo-id demo/tiny-grpo-chain-sum --save-card "$run_dir/model_card"

echo
echo "==== result ($((SECONDS - started)) s) ===="
"$PY" -m training.report "$run_dir/checkpoints"
echo "the model card as uploaded, with the same curves: $run_dir/model_card/README.md"
echo "training log: $run_dir/train.log"
