#!/usr/bin/env bash
# Run 21 (2026-11-29, sixth session): run 20 measured e938f7c's mHC at 1.880 ms per batch-1 step against
# 1.758 for 2fb4b2a in separate processes, though its device busy time fell (1705 -> 1683 us). Here the mHC
# formulations are timed alternately in one process (exp_mhc.py beside this file), with the optimized HLO of
# base and new. At e938f7c.
set -u
source scripts/device_sections.sh
export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1
sec exp 430 python exp_mhc.py base,new,expand_only,scaled_after,mix25 2
log end
