"""Loads an exported SavedModel as TF Serving would, with no Keras code.

Usage: serve_saved_model.py SAVED_MODEL_DIR INPUT_NPY RESULT_JSON
"""

import json
import sys

import numpy as np
import tensorflow as tf


def main(path, input_path, result_path):
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    _, inputs = serve.structured_input_signature
    (name,) = inputs
    outputs = serve(**{name: tf.constant(np.load(input_path))})
    with open(result_path, "w") as f:
        json.dump(
            {
                "package_imported": "keras_adashift" in sys.modules,
                "input_name": name,
                "outputs": {k: v.numpy().tolist() for k, v in outputs.items()},
            },
            f,
        )


if __name__ == "__main__":
    main(*sys.argv[1:])
