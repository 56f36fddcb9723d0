#!/usr/bin/env bash
# cliplens against rclip 4.0.8 on rclip's corpus, in one sitting, runs alternating.
# Needs ../shared/bench/rclip/run_rclip_baseline.sh to have built $BENCH (venvs, model, corpus).
#   bash benchmarks/bench_vs_rclip.sh      (env: BENCH=/tmp/rclip_bench RUNS=2 QRUNS=3
#                                           ENGINES="torch openvino openvino:int8")
# Whole-process wall time and peak RSS from /usr/bin/time; medians printed. The first index
# runs once per engine in ENGINES (ENGINE or ENGINE:PRECISION); each engine's one-time work
# (OpenVINO's conversion and measuring, the text tower's export) is done before the timed runs,
# as rclip's export was, and timed once on its own.
set -euo pipefail
HERE="$(cd "$(dirname "$0")/.." && pwd)"
BENCH="${BENCH:-/tmp/rclip_bench}" RUNS="${RUNS:-2}" QRUNS="${QRUNS:-3}"
read -ra ENGINES <<< "${ENGINES:-torch openvino openvino:int8}"
PY="${PYTHON:-$HERE/.venv/bin/python}"
read -ra CL <<< "${CLIPLENS:-$HERE/.venv/bin/cliplens}"  # a command, possibly with arguments
RCLIP="$BENCH/venv/bin/rclip"
export RCLIP_DATADIR="$BENCH/datadir" CLIPLENS_HOME="$BENCH/cliplens_home"
# as on a usual machine, Python may cache compiled modules (both tools' start-up depends on it)
unset PYTHONDONTWRITEBYTECODE
QUERY="a photo of a cat"
WEIGHTS="$BENCH/cliplens_vit_b_32_256_seed0.pt"
[ -f "$WEIGHTS" ] || "$PY" -c "
import torch, open_clip; torch.manual_seed(0)
torch.save(open_clip.create_model('ViT-B-32-256', pretrained=None).state_dict(), '$WEIGHTS')"
MODEL="ViT-B-32-256:$WEIGHTS" DB="$BENCH/cliplens.db" T="$BENCH/cl_times.txt"
cd "$BENCH/corpus"
cat ./* > /dev/null

run() {  # run LABEL PREP CMD...: one timed run appended to $T.LABEL
  local label=$1 prep=$2; shift 2
  eval "$prep"
  /usr/bin/time -a -o "$T.$label" -f "%e %M" "$@" > "$BENCH/cl_last.out" 2> "$BENCH/cl_last.err"
}
report() {  # report LABEL TEXT (nothing when LABEL was not run, e.g. RUNS=0)
  [ -s "$T.$1" ] || return 0
  "$PY" -c '
import statistics as st, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if l[:1].isdigit()]
w = [r[0] for r in rows]; m = st.median(r[1] for r in rows) / 1024
print(f"{sys.argv[2]:44s} wall median {st.median(w):7.3f} s (min {min(w):.3f}, max {max(w):.3f}, n={len(w)}), peak RSS {m:5.0f} MiB")' "$T.$1" "$2"
}
rm -f "$T".*
engine_args() {  # engine_args ENGINE[:PRECISION] -> the index flags
  local e=${1%%:*} p=${1#*:}
  echo "--engine $e"; [ "$p" != "$1" ] && echo "--precision $p"
}
# once, untimed in the table: each engine's one-time work over 20 photos (timed on its own)
photos=(*) && mkdir -p "$BENCH/once"
for f in "${photos[@]:0:20}"; do ln -sf "$PWD/$f" "$BENCH/once/$f"; done
for e in "${ENGINES[@]}"; do
  # shellcheck disable=SC2046
  /usr/bin/time -f "one-time work for $e: %e s, peak RSS %M KiB" "${CL[@]}" index "$BENCH/once" \
    --db "$BENCH/once.db" --model "$MODEL" $(engine_args "$e") > /dev/null 2>> "$T.once"
  rm -f "$BENCH/once.db"*
done
for _ in $(seq "$RUNS"); do
  run rclip_a "rm -f $RCLIP_DATADIR/db.sqlite3" "$RCLIP" -f "$QUERY"
  for ((i = ${#ENGINES[@]} - 1; i >= 0; i--)); do  # the first listed last: its vectors are queried
    e=${ENGINES[i]}
    # shellcheck disable=SC2046
    run "cl_a_${e//:/_}" "rm -rf $DB $DB-wal $DB-shm $DB.vectors" "${CL[@]}" index . --db "$DB" \
      --model "$MODEL" $(engine_args "$e")
  done
done
# once: the text tower export (what a first `cliplens search` does; rclip's ONNX files were
# exported by its baseline script) and a 100k-vector catalog (rclip's: probe_rclip.py inflate)
"${CL[@]}" search "$QUERY" --db "$DB" --model "$MODEL" -n 1 > /dev/null 2>&1
DB100K="$BENCH/cl100k.db" SYN="$BENCH/syn100k"
[ -f "$DB100K" ] || "$PY" "$HERE/benchmarks/make_synthetic_catalog.py" "$DB100K" --model "$MODEL" \
  --n 100000 --folder "$SYN"
for _ in $(seq "$QRUNS"); do
  run rclip_b ":" "$RCLIP" -f "$QUERY"
  run cl_b ":" "${CL[@]}" index . --db "$DB" --model "$MODEL"
  run cl_bq ":" "${CL[@]}" search "$QUERY" --db "$DB" --model "$MODEL" -n 10
  run rclip_c ":" "$RCLIP" -n -f "$QUERY"
  run cl_c ":" "${CL[@]}" search "$QUERY" --db "$DB" --model "$MODEL" --no-index -n 10
  RCLIP_DATADIR="$BENCH/datadir100k" run rclip_d ":" "$RCLIP" -n -f "$QUERY"
  run cl_d ":" "${CL[@]}" search "$QUERY" --db "$DB100K" --model "$MODEL" --no-index --in "$SYN" -n 10
done
"${CL[@]}" index . --db "$DB" --model "$MODEL" --verbose 2>&1 | tail -1 || true
echo "== $(lscpu | sed -n 's/Model name: *//p'), $(nproc) cores; $(ls | wc -l) photos"
grep "one-time" "$T.once" || true
report rclip_a "rclip (a) first index + 1 query"
for e in "${ENGINES[@]}"; do report "cl_a_${e//:/_}" "cliplens (a) first index, $e"; done
report rclip_b "rclip (b) no-op re-run + query"
report cl_b "cliplens (b) no-op re-index"
report cl_bq "cliplens (b') search (no-op re-index + query)"
report rclip_c "rclip (c) query only (-n)"
report cl_c "cliplens (c) query only (--no-index)"
report rclip_d "rclip (d) query only, 100k vectors"
report cl_d "cliplens (d) query only, 100k vectors"

# robustness set: what cliplens does with each file (rclip's behaviour: its baseline RESULTS.md)
cd "$BENCH/bad"
rm -rf "$BENCH/cl_bad.db" "$BENCH/cl_bad.db-wal" "$BENCH/cl_bad.db-shm"
/usr/bin/time -o "$BENCH/cl_bad.time" -f "cliplens (e) robustness set: wall %e s, peak RSS %M KiB" \
  "${CL[@]}" index . --db "$BENCH/cl_bad.db" --model "$MODEL" --format json > "$BENCH/cl_bad.json" \
  2> /dev/null || true
cat "$BENCH/cl_bad.time"
"$PY" -c '
import json, sys
stats = json.load(open(sys.argv[1]))
print("    indexed", stats["new"], "failed", stats["failed"])
for e in stats["errors"]:
    print("    ", e["path"].rsplit("/", 1)[-1], "->", e["error"])' "$BENCH/cl_bad.json"
