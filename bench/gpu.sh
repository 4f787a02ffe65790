#!/usr/bin/env bash
# The prepared GPU check for the device tool (about 10 minutes on one H100 / H200): versions,
# the parity and generation tests on the GPU, then the benchmark suite at realistic sizes, each
# against transformers on the same GPU. MFU is also given against the chip's datasheet bf16
# peak and decode MBU against its memory bandwidth (bench/common.py CHIPS).
#   - train step: two of Mistral-7B's layers (+ its 32000 vocab), batch 4 x 2048, bfloat16;
#   - decode / prefill: Megatron GPT-2 345M (float32 and bfloat16) and Mistral-7B (bfloat16);
#   - reduced precision (bench/precision.py): Mistral-7B in bfloat16, int8, int8 + int8 KV;
#   - attention (bench/attention.py): each of our paths (cudnn, blockwise, xla) and JAX's own
#     XLA one at Mistral-7B's head shape, causal and with its 4096 window, forward and backward;
#     and the train step at 8k tokens with cuDNN against blockwise.
# Figures are written under $OUT (the device tool brings them back) or bench/results/gpu.
set -u
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
export PYTHONPATH=$PWD JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
timeout 120 python3 bench/attention.py --json "$OUT/attention.json" 2>&1 | tail -12
timeout 200 python3 bench/train.py --preset mistral-7b --layers 2 --batch 4 --seq 2048 \
  --dtype bfloat16 --device cuda --repeats 5 --warmup 2 --json "$OUT/train.json" 2>&1 | tail -5
for attention in cudnn blockwise; do
  timeout 150 python3 bench/train.py --preset mistral-7b --layers 2 --batch 1 --seq 8192 \
    --dtype bfloat16 --device cuda --repeats 3 --warmup 1 --only ours --attention $attention \
    --json "$OUT/train_8k_$attention.json" 2>&1 | tail -2
done
for dtype in bfloat16 float32; do
  timeout 120 python3 bench/decode.py --models gpt2-345m --device cuda --dtype $dtype \
    --json "$OUT/decode_gpt2_345m_$dtype.json" 2>&1 | grep '^{"model"'
done
timeout 200 python3 bench/decode.py --models mistral-7b --device cuda --dtype bfloat16 \
  --json "$OUT/decode_mistral_7b.json" 2>&1 | grep '^{"model"'
# reduced precision: Mistral-7B's shape decoded in bfloat16, int8 weights (XLA's convert fused
# into the dot) and int8 + an int8 KV cache, against transformers' bfloat16
timeout 240 python3 bench/precision.py --model mistral-7b --device cuda \
  --json "$OUT/precision_mistral_7b.json" 2>&1 | grep -v '^ '
timeout 150 python3 -m pytest -p no:cacheprovider tests/test_parity.py tests/test_generate.py \
  tests/test_models.py tests/test_attention.py -q -x -k "not sharded and not text and not chat and not command and not compile_time" \
  2>&1 | tail -5
