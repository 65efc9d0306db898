#!/usr/bin/env bash
# The device checks of a session lent one GPU, as one prepared script (about 8 minutes on one H200): the schedule
# benchmark (E2E / GIM / LoCo on ResNet-50 at 224 px, bf16, benchmarks/gpu.py) and stage parallelism on the GPU
# (benchmarks/pipeline.py --device cuda: 2 processes share the one GPU over gloo). It runs from the repository root
# with the machine's own python3 (torch, timm, accelerate, safetensors installed there) and this checkout on
# PYTHONPATH, writes its JSON and logs into $OUT (the device tool brings them back) or benchmarks/results, and leaves
# the README alone. Back on this machine: copy the JSON files into benchmarks/results, then
#   .venv/bin/python benchmarks/pipeline.py --device cuda --readme-only
# writes the README block `pipeline-gpu`.
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
python3 -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__, torch.cuda.get_device_name())' \
    | tee "$out/gpu_session.log" || exit 2
timeout 200 python3 benchmarks/gpu.py --batch 128 --steps 10 --out "$out/schedule_gpu.json" 2>&1 \
    | tee -a "$out/gpu_session.log"
timeout 330 python3 benchmarks/pipeline.py --device cuda --batch-scale 8 --models resnet50 vit_tiny_patch16_224 \
    --no-readme --out "$out/pipeline_gpu.json" 2>&1 | tee -a "$out/gpu_session.log"
