#!/bin/bash
# On the GPU machine (device tool), from the repo root: unpack carried peer bundles, then run what is asked:
#   scripts/gpu_check.sh tests            -> pytest -m gpu
#   scripts/gpu_check.sh bench [ARGS...]  -> tritium bench kernels ARGS (results under $OUT)
# Carry .whl/bundles (made by ../shared/tools/peer_bundles.sh fa3) to time FlashAttention-3.
set -u
OUT=${OUT:-/tmp/tritium-out}
mkdir -p "$OUT"
if [ -f .whl/bundles/fa3_site.tar.xz ] && [ ! -d /tmp/peers/flash_attn_interface* ]; then
  python3 -c "import tarfile;tarfile.open('.whl/bundles/fa3_site.tar.xz').extractall('/tmp/peers',filter='data')"
fi
export PYTHONPATH="$PWD:/tmp/peers${PYTHONPATH:+:$PYTHONPATH}"
what=$1; shift
case $what in
  tests) python3 -m pytest -m gpu -q -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
  bench) python3 -m tritium.cli bench kernels --out "$OUT" "$@" 2>&1 | grep -v "scenarios:" | tee -a "$OUT/bench.log" ;;
  *) echo "usage: $0 tests|bench [ARGS...]" >&2; exit 2 ;;
esac
