#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# Checks `pip install .`: a fresh venv, the package built from this tree by
# meson-python, then `import resa` from outside the source tree with no
# environment variables: __version__ must be the header's, and a tiny attend
# must match numpy.  Exit status 0 on success.
#
#   usage: scripts/check-pip-install.sh [PIP ARGS...]
#   e.g.   scripts/check-pip-install.sh -Csetup-args=-Dgpu=disabled   (no CUDA module: faster)
#
# $PYTHON picks the interpreter that makes the venv (default python3); the
# venv goes to a temporary directory, removed on exit.  pip needs an index
# (numpy, ml_dtypes, meson-python, meson, ninja), or a wheelhouse given as
# --no-index --find-links DIR in the arguments.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

want=$("$python" "$root/scripts/header_version.py" "$root/include/resa.h" version)
echo "check-pip-install: venv in $work, expecting version $want"
"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
start=$(date +%s)
"$work/venv/bin/python" -m pip install "$@" "$root"
echo "check-pip-install: pip install took $(( $(date +%s) - start )) s"

# From an empty directory and with a clean environment, so that nothing but
# the installed package can be imported (not bindings/python, not a
# RESA_LIBRARY or a build tree on LD_LIBRARY_PATH).
mkdir "$work/elsewhere"
cd "$work/elsewhere"
env -i HOME="$work" PATH=/usr/bin:/bin "$work/venv/bin/python" - "$want" <<'PY'
import os, sys
import numpy as np
import resa
from resa import _lib

want = sys.argv[1]
here = os.path.dirname(resa.__file__)
assert resa.__version__ == want, "__version__ %s, the header says %s" % (resa.__version__, want)
assert resa.version_string() == want, "the loaded library is %s" % resa.version_string()
assert os.path.dirname(_lib.path) == here, "libresa loaded from %s, not the package" % _lib.path
assert "site-packages" in here, here

rng = np.random.default_rng(0)
n, hq, hkv, d = 5, 4, 2, 16
q = rng.standard_normal((n, hq, d)).astype(np.float32)
k = rng.standard_normal((n, hkv, d)).astype(np.float32)
v = rng.standard_normal((n, hkv, d)).astype(np.float32)
with resa.Context("cpu", num_layers=1, num_q_heads=hq, num_kv_heads=hkv, head_dim=d) as ctx:
    seq = ctx.seq_create()
    with ctx.step([seq], resa.Mode.APPEND, [n]) as step:
        out = step.attend(0, q, k, v)
# dense causal attention in float64
ref = np.empty((n, hq, d))
for t in range(n):
    for h in range(hq):
        s = k[:t + 1, h // 2] @ q[t, h] / np.sqrt(d)
        w = np.exp(s - s.max())
        ref[t, h] = (w / w.sum()) @ v[:t + 1, h // 2]
err = float(np.abs(out - ref).max())
assert err < 1e-5, err
cuda = os.path.exists(os.path.join(here, "libresa-cuda.so.0"))
print("check-pip-install: OK: resa %s from %s, attend max |error| %.2g, CUDA module %s"
      % (resa.__version__, here, err, "in the package" if cuda else "not built"))
PY
