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
# Tools the tests run (nats-server), installed by scripts/setup-system.
if [ -z "${ONECARD_TOOLS:-}" ]; then
  if mkdir -p /var/cache/onecard-tools 2>/dev/null && [ -w /var/cache/onecard-tools ]; then
    export ONECARD_TOOLS=/var/cache/onecard-tools
  else
    export ONECARD_TOOLS="${HOME:-$PWD}/.cache/onecard-tools"
  fi
fi
case ":$PATH:" in
  *":$ONECARD_TOOLS/nats-venv/bin:"*) ;;
  *) export PATH="$ONECARD_TOOLS/nats-venv/bin:$PATH" ;;
esac
