#!/bin/sh
# Install phase of com.edgeagent.EdgeAgent (docs/greengrass.md), shipped as an artifact of the component:
#   sh {artifacts:path}/install.sh {artifacts:path} {artifacts:decompressedPath} UseSystemOnnxRuntime InstallProfile
# Why a file and not the recipe's Script: nucleus lite reads every `{` in a Script as a recipe variable (no shell
# brace groups, no ${VAR}), reads recipes into an 8,196-byte buffer (two copies of this would not fit), and runs
# scripts with /bin/sh (dash): this file is POSIX sh and runs unchanged on both nuclei.
# Runs in the component's work directory. Re-runs on every nucleus start: skipped while nothing changed.
#
# Offline devices: when the component carries a wheelhouse (artifact edge_agent-wheelhouse-<arch>.zip, made by
# scripts/build-component --offline), pip only reads that (--no-index --find-links) and never the network. The
# classic nucleus and lite's cloud deployments unpack it (Unarchive: ZIP) into the decompressed path; lite's
# local deployments leave that directory empty, so then it is unpacked here.
set -eu
ART=${1%/}
DEC=${2%/}
SYSTEM_ORT=$3
PROFILE=$4
case "$SYSTEM_ORT" in true|false) ;; *) echo "UseSystemOnnxRuntime must be true or false, not '$SYSTEM_ORT'" >&2; exit 1 ;; esac
case "$PROFILE" in cpu|gpu) ;; *) echo "InstallProfile must be cpu or gpu, not '$PROFILE'" >&2; exit 1 ;; esac
WHEEL=$(ls "$ART"/edge_agent-*.whl | head -n 1)

ZIP=""
for z in "$ART"/edge_agent-wheelhouse-*.zip; do
  if [ -f "$z" ]; then ZIP=$z; fi
done
STAMP="$(sha256sum "$WHEEL" | cut -d' ' -f1) system-onnxruntime=$SYSTEM_ORT profile=$PROFILE offline=$([ -n "$ZIP" ] && echo yes || echo no)"
if [ -x venv/bin/edge-agent ] && [ "$(cat venv/.edge-agent-installed 2>/dev/null)" = "$STAMP" ]; then
  echo "edge-agent already installed"
  exit 0
fi

# Our own unpacked copy of the wheelhouse goes whatever happens (it is as large as the venv).
trap 'rm -rf .wheelhouse.tmp wheelhouse' EXIT
WH=""
if [ -n "$ZIP" ]; then
  stem=$(basename "$ZIP" .zip)
  if [ -d "$DEC/$stem" ] && [ -n "$(ls -A "$DEC/$stem")" ]; then
    WH="$DEC/$stem"
  else
    echo "unpacking $(basename "$ZIP") (the nucleus left $DEC empty)"
    rm -rf .wheelhouse.tmp wheelhouse
    python3 -m zipfile -e "$ZIP" .wheelhouse.tmp
    mv .wheelhouse.tmp wheelhouse
    WH="$PWD/wheelhouse"
  fi
fi

ORT=onnxruntime
if [ "$PROFILE" = gpu ]; then ORT=onnxruntime_gpu; fi
if [ -n "$WH" ] && [ "$SYSTEM_ORT" = false ] && ! ls "$WH"/$ORT-*.whl >/dev/null 2>&1; then
  echo "InstallProfile is $PROFILE but the wheelhouse has no $ORT wheel: build it with" >&2
  echo "scripts/build-component --offline --profile $PROFILE (or set UseSystemOnnxRuntime)" >&2
  exit 1
fi

rm -rf venv
if [ "$SYSTEM_ORT" = true ]; then
  # JetPack: NVIDIA's onnxruntime-gpu is installed system-wide (PyPI has no aarch64 GPU build); the venv sees it
  # and gets no ONNX Runtime of its own, which would shadow it.
  python3 -m venv --system-site-packages venv
else
  python3 -m venv venv
fi
set -- venv/bin/python -m pip --disable-pip-version-check install
if [ -n "$WH" ]; then
  set -- "$@" --no-index --find-links "$WH"
fi

# The agent's extras pick the ONNX Runtime build: edge-agent[cpu] or edge-agent[gpu] (never both: each ships the
# module onnxruntime). A wheel without those extras names onnxruntime among its own requirements.
if python3 - "$WHEEL" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
sys.exit(0 if b"\nProvides-Extra: cpu" in z.read(meta) else 1)
EOF
then
  if [ "$SYSTEM_ORT" = true ]; then "$@" "$WHEEL"; else "$@" "$WHEEL[$PROFILE]"; fi
else
  "$@" --no-deps "$WHEEL"
  venv/bin/python - > venv/requirements.txt <<'EOF'
import importlib.metadata as m
print("\n".join(r for r in m.requires("edge-agent") or [] if not r.startswith("onnxruntime") and "extra ==" not in r))
EOF
  "$@" -r venv/requirements.txt
  if [ "$SYSTEM_ORT" = false ]; then "$@" "$(echo $ORT | tr _ -)"; fi
fi
if [ "$SYSTEM_ORT" = true ] && ! venv/bin/python -c "import onnxruntime"; then
  echo "UseSystemOnnxRuntime is true but python3 has no onnxruntime" >&2
  exit 1
fi
echo "$STAMP" > venv/.edge-agent-installed
echo "edge-agent installed ($( [ -n "$WH" ] && echo "offline, from $WH" || echo online))"
