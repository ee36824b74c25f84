#!/usr/bin/env bash
# `make demo`: compile the bundled digits example for edge-arm, then verify and run the signed,
# encrypted bundle the way a device would.
set -euo pipefail
lepton=${1:-lepton}; out=${2:-out/demo}; keys=${3:-out/demo-keys}
rm -rf "$out"; mkdir -p "$out"
[ -f "$keys/signing-private.pem" ] || "$lepton" keys generate --dir "$keys"
"$lepton" compile examples/digits/digits_cnn.onnx --target edge-arm \
    --calib examples/digits/calib.npz --eval examples/digits/eval.npz -o "$out" \
    --sign-key "$keys/signing-private.pem" --recipient "$keys/encryption-public.pem"
bundle=$(ls -d "$out"/*.lepton)
echo
echo "bundle: $bundle"
"$lepton" verify "$bundle" --trust "$keys/signing-public.pem" --state "$out/device-state.json"
"$lepton" run "$bundle" --key "$keys/encryption-private.pem" --trust "$keys/signing-public.pem" \
    --state "$out/device-state.json" --inputs examples/digits/eval.npz -o "$out/predictions.npz"
