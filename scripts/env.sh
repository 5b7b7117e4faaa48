# Sourced by the scripts: one cargo target directory outside the checkout,
# shared by the run and test commands (RocksDB's C++ takes ~25 min to build
# cold; CI keeps this directory between runs).
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if mkdir -p /var/cache/onecard-target 2>/dev/null && [ -w /var/cache/onecard-target ]; then
    export CARGO_TARGET_DIR=/var/cache/onecard-target
  else
    export CARGO_TARGET_DIR="$PWD/target"
  fi
fi
