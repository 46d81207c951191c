#!/bin/bash
# interleaved OpenMP runtime comparison of the default step
cd /work/main
IOMP=/work/main/.venv/lib/libiomp5.so
for rep in 1 2 3; do
  for cfg in gomp gomp-bind iomp iomp-bt1; do
    case $cfg in
      gomp) envs="";;
      gomp-bind) envs="OMP_PROC_BIND=close OMP_PLACES=cores";;
      iomp) envs="LD_PRELOAD=$IOMP";;
      iomp-bt1) envs="LD_PRELOAD=$IOMP KMP_BLOCKTIME=1 KMP_AFFINITY=granularity=fine,compact,1,0";;
    esac
    out=/tmp/omp/$cfg-$rep
    mkdir -p $out
    env $envs .venv/bin/python -m benchmarks.run --sections step --step-variants default,bf16-cl --step-warmup 2 --steps 5 --markdown '' --out-dir $out > $out/log 2>&1
    echo "$cfg $rep: $(grep -E '^\| (default|bf16-cl) ' $out/log | awk -F'|' '{print $2 $3}' | tr '\n' ' ')"
  done
done
