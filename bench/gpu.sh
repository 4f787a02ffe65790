#!/usr/bin/env bash
# The prepared GPU check for the device tool: versions, the parity and generation tests on the
# GPU, then decode speed against transformers on the same GPU (float32 and bfloat16).
set -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, transformers, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
export PYTHONPATH=$PWD JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
timeout 300 python3 -m pytest -p no:cacheprovider tests/test_parity.py tests/test_generate.py tests/test_models.py \
  -q -x -k "not sharded and not text and not chat and not command and not compile_time" 2>&1 | tail -15
for dtype in float32 bfloat16; do
  # the GPU machine has no network: SmolLM2 (a wheel from the registry) is not there, GPT-2 is
  timeout 150 python3 bench/decode.py --models gpt2 --device cuda --dtype $dtype 2>&1 | grep -v Writing | tail -45
done
