#!/usr/bin/env bash
# Every GPU figure the README asks for, in one run of at most 9 minutes (the sum of its parts' limits), on random
# weights at a real model's shape (nothing downloaded): our model against transformers (bench_model.py), train.py's loop per
# method against the bare model plus the paper table's training estimate (bench_train.py), eval.py's probes
# eager and with compiled decoding (bench_eval.py). Each part has its own time limit, so one that hangs or
# fails does not cost the others; every output is printed and kept under $OUT (default: bench/out).
#
#   SHAPE=DIR bash bench/gpu.sh     # DIR: a Qwen2.5 model folder (config.json, tokenizer files; the weights are
#                                   # not read), e.g. a download of Qwen/Qwen2.5-0.5B-Instruct
#   GPU=0 bash bench/gpu.sh         # the same steps on the CPU at the tiny shape: checks the script, not speed
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cuda=$([ "${GPU:-1}" = 0 ] || echo --cuda)
shape=${SHAPE:+--shape $SHAPE}
status=0

part() {  # part NAME SECONDS COMMAND...: run with a time limit, tee to $OUT/NAME.txt, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee "$OUT/$name.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== $name: exit $rc (124: over its ${limit} s)" | tee -a "$OUT/$name.txt"; status=1; }
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$OUT/machine.txt"
part model 90 python bench/bench_model.py $cuda --repeats 3
part train 270 python bench/bench_train.py $cuda $shape --estimate
part eval 100 python bench/bench_eval.py $cuda $shape
part eval_compiled 80 python bench/bench_eval.py $cuda $shape --compile --tasks triviaqa
exit $status
