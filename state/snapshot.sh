#!/bin/bash
# copy the L2O run's work state into state/ (tracked) and commit it
cd "$(dirname "$0")/.." || exit 1
mkdir -p state/l2o
for f in runs/l2o/*; do
  b=$(basename "$f")
  case "$b" in
    *.db) sqlite3 "$f" ".backup state/l2o/$b" ;;
    tb|*.tmp) ;;
    *) [ -f "$f" ] && cp -p "$f" state/l2o/ ;;
  esac
done
cp -p runs/l2o-*.log state/ 2>/dev/null
msg="L2O benchmark: work state of the run in progress, copied to state/ so a later session resumes it (runs/l2o stays untracked, so the commit stamped on rows is clean)"
git add -f -- state && git commit -q -m "${1:-$msg}" && git log --oneline -1
