#!/usr/bin/env bash
# Runs masque-relay's cargo-fuzz targets, each for a time budget (README "Fuzzing").
#
#   tests/fuzz/run.sh [SECONDS] [TARGET...]      default: 60 s, every target
#
# Each target starts from its committed corpus (tests/fuzz/corpus/TARGET, read only) and writes
# what it finds to a scratch corpus (tests/fuzz/target/corpus/TARGET, ignored by git). Crashes
# land in tests/fuzz/artifacts/TARGET/. Needs `cargo install cargo-fuzz`; on stable Rust,
# RUSTC_BOOTSTRAP=1 lets rustc take the nightly-only flags cargo fuzz passes (-Z sanitizer=...).
# Extra libFuzzer flags can come from FUZZ_ARGS, cargo fuzz flags from CARGO_FUZZ_ARGS
# (e.g. CARGO_FUZZ_ARGS="--sanitizer none").
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
export RUSTC_BOOTSTRAP=1
secs=${1:-60}
shift $(($# > 0 ? 1 : 0))
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir tests/fuzz)
fi
failed=()
for t in "${targets[@]}"; do
    scratch=tests/fuzz/target/corpus/$t
    mkdir -p "$scratch" "tests/fuzz/corpus/$t"
    max_len=4096
    # Long enough to reach the 16 KiB head limit.
    [ "$t" = http1 ] && max_len=20000
    echo "=== $t: ${secs}s"
    # shellcheck disable=SC2086
    if ! cargo fuzz run --fuzz-dir tests/fuzz ${CARGO_FUZZ_ARGS:-} "$t" "$scratch" "tests/fuzz/corpus/$t" -- \
        -max_total_time="$secs" -max_len="$max_len" -timeout=10 -malloc_limit_mb=512 \
        -print_final_stats=1 ${FUZZ_ARGS:-}; then
        failed+=("$t")
    fi
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]} (inputs in tests/fuzz/artifacts/)"
    exit 1
fi
echo "all ${#targets[@]} targets ran clean for ${secs}s each"
