#!/usr/bin/env bash
# The GPU-relevant benchmarks in one call (under 10 minutes on one H100/H200):
#   bash benchmarks/gpu.sh            # from the repository root, jax[cuda] installed
# Train step at the paper shape, the vectorised K sweep up to 256, data
# generation and adaptation cost. PyTorch is not needed (the train-step
# figure is bnjax alone unless a CUDA torch is installed, which it compares on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import jax; print(jax.devices())"
python benchmarks/train_many.py --ks=1,32,128,256 --strategies=vmap --reps=3
python benchmarks/train_step.py --shapes=64x64x16,16x64x16 --blocks=3
python benchmarks/data_gen.py --n=100000 --ref_n=200 --reps=3
python benchmarks/adapt_cost.py --width=64 --n=256 --reps=3
