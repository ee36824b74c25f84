#!/usr/bin/env bash
# `make demo`: compile the bundled digits example for edge-arm and show what came out.
set -euo pipefail
lepton=${1:-lepton}; out=${2:-out/demo}; keys=${3:-out/demo-keys}
rm -rf "$out"; mkdir -p "$out"
"$lepton" compile examples/digits/digits_cnn.onnx --target edge-arm \
    --calib examples/digits/calib.npz --eval examples/digits/eval.npz -o "$out"
echo
echo "bundle: $(ls -d "$out"/*.lepton)"
