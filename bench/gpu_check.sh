#!/usr/bin/env bash
# One command for the day a GPU is lent (within an 8-minute budget, sized for one H100-class GPU):
#   bash bench/gpu_check.sh ../shared/data/cifar10-slice
# every script one epoch, a resume, --compile, throughput; one summary file. What it runs:
# bench/gpu_check.py (python bench/gpu_check.py -h), run by $PYTHON (default: python); flags after the
# folder go to it (--out, --budget, ...).
exec "${PYTHON:-python}" "$(dirname "$0")/gpu_check.py" "$@"
