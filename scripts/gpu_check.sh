#!/bin/bash
# On the GPU machine (device tool), from the repo root: unpack carried packages, then run what is asked:
#   scripts/gpu_check.sh tests                 -> pytest -m gpu
#   scripts/gpu_check.sh bench [ARGS...]       -> tritium bench kernels ARGS (results under $OUT)
#   scripts/gpu_check.sh throughput [ARGS...]  -> tritium bench throughput --model-config llama-3.1-8b ARGS
#   scripts/gpu_check.sh moe [ARGS...]         -> tritium tune --op moe, then tritium bench moe ARGS on its configs
#                                                 (the tuned table lands in $OUT/cache/moe_configs.json)
#   scripts/gpu_check.sh serve [ARGS...]       -> tritium serve (8B shape) + tritium bench serve ARGS, burst then
#                                                 Poisson at 4 req/s; /metrics saved after them
#   scripts/gpu_check.sh structured [ARGS...]  -> scripts/bench_structured_step.py --model-config llama-3.1-8b ARGS
#                                                 (a structured and a penalized decode step at batch 64 against a free
#                                                 one; --tokenizer DIR for Llama 3.1's own, else a synthetic BPE)
# Carry .whl/bundles (made by ../shared/tools/peer_bundles.sh fa3) to time FlashAttention-3, and .whl/serve
# (wheels of fastapi, starlette, pydantic, pydantic-core, annotated-types, typing-inspection, uvicorn,
# opentelemetry-api, typing-extensions for Python 3.12) to serve: the GPU image lacks them. Carry .whl/structured
# (wheels of xgrammar, apache-tvm-ffi, jsonschema, jsonschema-specifications, referencing, rpds-py, attrs for
# Python 3.12) for structured output and its GPU tests.
set -u
OUT=${OUT:-/tmp/tritium-out}
mkdir -p "$OUT"
if [ -f .whl/bundles/fa3_site.tar.xz ] && [ ! -d /tmp/peers/flash_attn_interface* ]; then
  python3 -c "import tarfile;tarfile.open('.whl/bundles/fa3_site.tar.xz').extractall('/tmp/peers',filter='data')"
fi
if ls .whl/serve/*.whl > /dev/null 2>&1 && ! python3 -c "import uvicorn, fastapi" 2> /dev/null \
    && [ ! -d /tmp/site/uvicorn ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/serve/*.whl
fi
if ls .whl/structured/*.whl > /dev/null 2>&1 && ! python3 -c "import xgrammar, jsonschema" 2> /dev/null \
    && [ ! -d /tmp/site/xgrammar ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/structured/*.whl
fi
export PYTHONPATH="$PWD:/tmp/peers:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
what=$1; shift
case $what in
  tests)
    # The server tests hold no GPU test but import openai/schemathesis/uvicorn/pydantic; leave them out where missing.
    skip=()
    python3 -c "import openai, schemathesis, uvicorn, pydantic" 2> /dev/null || skip=("--ignore-glob=tests/test_server*.py"
      --ignore=tests/bench/test_serve_bench.py --ignore=tests/engine/test_generation_defaults.py
      --ignore=tests/test_metrics.py --ignore=tests/test_docs.py)
    python3 -m pytest -m gpu -q -p no:cacheprovider "${skip[@]}" "$@" tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
  bench) python3 -m tritium.cli bench kernels --out "$OUT" "$@" 2>&1 | grep -v "scenarios:" | tee -a "$OUT/bench.log" ;;
  moe)
    export TRITIUM_CACHE_DIR="$OUT/cache"
    python3 -m tritium.cli tune --op moe 2>&1 | tr '\r' '\n' | grep -v "/s\]$" | tee -a "$OUT/tune_moe.log"
    python3 -m tritium.cli bench moe --out "$OUT" "$@" 2>&1 | tr '\r' '\n' | grep -v "/s\]$" | tee -a "$OUT/moe.log" ;;
  throughput)
    python3 -m tritium.cli bench throughput --model-config llama-3.1-8b --out "$OUT" "$@" 2>&1 | tr '\r' '\n' \
      | grep -v "/s\]$" | tee -a "$OUT/throughput.log" ;;
  serve)
    python3 -m tritium.cli serve --model-config llama-3.1-8b --port 8011 > "$OUT/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 300); do
      python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8011/health')" 2> /dev/null && break
      kill -0 $server 2> /dev/null || { tail -20 "$OUT/serve.log"; exit 1; }
      sleep 1
    done
    for rate in inf 4; do
      python3 -m tritium.cli bench serve --url http://127.0.0.1:8011 --request-rate $rate --out "$OUT" "$@" 2>&1 \
        | tr '\r' '\n' | grep -v "/s\]$" | tee -a "$OUT/serve_bench.log"
    done
    python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8011/metrics').read().decode())" \
      > "$OUT/metrics.txt"  # vLLM-named series after the runs (docs/metrics.md)
    kill -TERM $server; wait $server ;;
  structured)
    python3 scripts/bench_structured_step.py --model-config llama-3.1-8b --out "$OUT/structured_step.json" "$@" 2>&1 \
      | tee -a "$OUT/structured_step.log" ;;
  *) echo "usage: $0 tests|bench|throughput|moe|serve|structured [ARGS...]" >&2; exit 2 ;;
esac
