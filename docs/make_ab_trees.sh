#!/usr/bin/env bash
# The source trees docs/gpu_ab_session.sh compares: each NAME=REF[@XLA_FLAGS] becomes a
# `git archive` copy of REF under third_party/trees/NAME (git-ignored; carry it to the
# GPU machine), with the flags, if any, in its xla_flags file.
# Usage, from the repository root:
#   bash docs/make_ab_trees.sh main=main clip=wip/clip-norm nomerge=main@--xla_gpu_dot_merger_threshold_mb=0
set -eu
for spec in "$@"; do
  name=${spec%%=*}; ref=${spec#*=}; flags=""
  case $ref in *@*) flags=${ref#*@}; ref=${ref%%@*} ;; esac
  rm -rf "third_party/trees/$name" && mkdir -p "third_party/trees/$name"
  git archive "$ref" | tar -x -C "third_party/trees/$name"
  [ -z "$flags" ] || echo "$flags" > "third_party/trees/$name/xla_flags"
  echo "$name: $(git rev-parse --short "$ref")${flags:+ with XLA_FLAGS=$flags}"
done
du -sh third_party/trees
