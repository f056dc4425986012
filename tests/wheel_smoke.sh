#!/usr/bin/env bash
# Builds the sdist and the wheel, installs the wheel with its `examples` extra
# into a fresh virtual environment outside the repository, and from a folder
# outside the repository runs the command-line demo, three training steps
# with AdaShift, and a `load_model` in a new process. About 2-3 minutes on
# 2 cores, most of it installing TensorFlow (from pip's cache or index).
#
#     bash tests/wheel_smoke.sh               # the build runs in .venv
#     PYTHON=python3.12 bash tests/wheel_smoke.sh
#     KEEP=1 bash tests/wheel_smoke.sh        # keep the scratch folder
#
# Needs `build` (in the `test` extra) and an index for the build's own
# setuptools and the wheel's dependencies.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d "${TMPDIR:-/tmp}/keras-adashift-wheel.XXXXXX")
if [[ -z ${KEEP:-} ]]; then
    trap 'rm -rf "$work"' EXIT
else
    echo "scratch folder: $work"
fi
start=$SECONDS
step() { echo "=== [$((SECONDS - start)) s] $*"; }

step "python -m build (sdist, then the wheel from the sdist)"
"$python" -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 ||
    { tail -n 40 "$work/build.log"; exit 1; }
wheel=$(ls "$work"/dist/*.whl)
ls "$work/dist"

step "fresh venv at $work/venv; pip install $(basename "$wheel")[examples]"
"$python" -m venv "$work/venv"
py=$work/venv/bin/python
"$py" -m pip install --disable-pip-version-check "$wheel[examples]" \
    >"$work/install.log" 2>&1 || { tail -n 40 "$work/install.log"; exit 1; }
grep '^Successfully installed' "$work/install.log" | tr ' ' '\n' |
    grep -E '^(keras|keras-adashift|tensorflow|tensorboard)-[0-9]' | xargs

# Nothing from the repository or the caller's environment may leak in.
cd "$work"
unset PYTHONPATH
export KERAS_BACKEND=tensorflow TF_CPP_MIN_LOG_LEVEL=2

step "keras-adashift --help"
"$work/venv/bin/keras-adashift" --help >/dev/null

step "python -m keras_adashift demo --epochs 1"
"$py" -m keras_adashift --no-progress --out "$work/out" demo --epochs 1
test -s "$work/out/demo/results.json"

step "three AdaShift steps, saved"
"$py" - "$work/model.keras" <<'EOF'
import pathlib
import sys

import keras_adashift

installed = pathlib.Path(keras_adashift.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in installed.parents, installed
assert "keras" not in sys.modules  # the import is lazy

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_adashift import AdaShift  # noqa: E402

keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(3, 16, 4)).astype("float32")
y = rng.normal(size=(3, 16, 2)).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
# keep_num=1: the weights move from the second step on.
model.compile(optimizer=AdaShift(learning_rate=1e-2, keep_num=1), loss="mse")
before = model.get_weights()
losses = [float(model.train_on_batch(x[i], y[i])) for i in range(3)]
assert all(np.isfinite(losses)), losses
assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3
moved = [not np.array_equal(a, b) for a, b in zip(before, model.get_weights())]
assert all(moved), moved
model.save(sys.argv[1])
print(f"keras_adashift {keras_adashift.__version__} from {installed.parent}")
print(f"keras {keras.__version__}, backend {keras.backend.backend()}, "
      f"losses {[round(v, 4) for v in losses]}")
EOF

step "load_model in a new process, keras_adashift imported before keras"
"$py" - "$work/model.keras" <<'EOF'
import sys

import keras_adashift  # registers AdaShift when keras is imported
import keras

model = keras.models.load_model(sys.argv[1])  # no custom_objects
assert type(model.optimizer) is keras_adashift.AdaShift, model.optimizer
assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 3
print("loaded:", type(model.optimizer).__name__)
EOF

step "wheel smoke test passed"
