#!/usr/bin/env bash
# The GPU benches in one command, for a lent GPU machine (torch and transformers in its image, no
# vLLM, no Ray; bench/RESULTS.md, GPU). After `make gpu-carry` here:
#
#     run(carry=[".gpu"], timeout_s=590, command="bash bench/perf/gpu.sh")
#
# 1. bench/perf/learner.py: ekipl against TRL's GRPOTrainer at Qwen2-VL-2B's language-model proportions;
# 2. bench/perf/gpu.py: the learner per ZeRO stage, weight export, the objective, HF generation and the
#    learner variants on Qwen2-VL-2B's shapes.
# Each under its own time limit (LEARNER_S, GPU_S seconds; LEARNER_ARGS for bench/perf/learner.py), so
# that a slow or failing first part still leaves time for the second; both print each part's result
# as it finishes. Logs and JSON go to $OUT (the device tool's folder that comes back), else ./gpu-out
# (7 files: env.txt, two build logs, learner.log/json, gpu.log/json; 8 come back at most).
set -u
out=${OUT:-$PWD/gpu-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD PYTHONUNBUFFERED=1 DS_ACCELERATOR=cuda
export EKIPL_CACHE=${EKIPL_CACHE:-/tmp/ekipl-cache}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import importlib.metadata as m, sys; print(sys.version.split()[0], *(p + ' ' + m.version(p) for p in
        ('torch', 'transformers', 'deepspeed', 'trl', 'accelerate', 'datasets', 'pyarrow', 'triton')))"
} 2>&1 | tee "$out/env.txt"

# Both models first, side by side on the CPU (a build beside a timed part slowed it by up to 40%).
start=$SECONDS
pids=()
for m in bench-qwen2-vl-2b-lm bench-qwen2-vl-2b; do
    python3 -c "from ekipl.models.tiny import build_tiny; build_tiny('$m')" >"$out/build-$m.log" 2>&1 &
    pids+=($!)
done
for p in "${pids[@]}"; do
    wait "$p" || { echo "a model build failed"; tail -20 "$out"/build-*.log; exit 1; }
done
echo "models built in $((SECONDS - start)) s"
start=$SECONDS
# 8 prompts (64 sequences): at 2 the GPU step was launch- and optimizer-bound (bench/RESULTS.md, GPU)
# shellcheck disable=SC2086
timeout "${LEARNER_S:-230}" python3 -m bench.perf.learner ${LEARNER_ARGS:---prompts 8} --json "$out/learner.json" \
    >"$out/learner.log" 2>&1
echo "bench.perf.learner: exit $? after $((SECONDS - start)) s" | tee -a "$out/learner.log"
grep -v Warning "$out/learner.log" | tail -c 5000
start=$SECONDS
timeout "${GPU_S:-290}" python3 -m bench.perf.gpu --json "$out/gpu.json" >"$out/gpu.log" 2>&1
echo "bench.perf.gpu: exit $? after $((SECONDS - start)) s" | tee -a "$out/gpu.log"
grep -v Warning "$out/gpu.log" | tail -c 6000
