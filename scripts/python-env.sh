# Sourced by install.sh, run_example.sh and test.sh (before they cd): the Python they install
# into and run with. PYTHON (default: python3 from PATH) may be a virtual environment's
# interpreter that is not activated, given relative to the folder the script was started from;
# every command then runs as "$PY" -m ..., never as a bare `deformable-detr` or `python3`.
PY=${PYTHON:-python3}
case "$PY" in
  */*)
    if [ ! -x "$PY" ]; then
      echo "PYTHON=$PY: no such interpreter (relative to $PWD)" >&2
      exit 2
    fi
    PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;
  *)
    if ! command -v "$PY" >/dev/null 2>&1; then
      echo "PYTHON=$PY: not found on PATH" >&2
      exit 2
    fi ;;
esac
export PYTHON="$PY"
ddetr() { "$PY" -m deformable_detr "$@"; }
