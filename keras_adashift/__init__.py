"""AdaShift for Keras 3 (Zhou et al., ICLR 2019).

`import keras_adashift` is cheap: it imports neither Keras nor a backend, so
the command line (`python -m keras_adashift --help`) starts at once. The
optimizer lives in `keras_adashift.adashift`, and importing that module is
what registers `keras_adashift>AdaShift` with Keras for
`keras.models.load_model`. It is imported

- now, if Keras is already imported (it then costs next to nothing);
- otherwise as soon as Keras is imported, by an import hook, so
  `import keras_adashift` followed by `keras.models.load_model(...)` works
  in either import order;
- at the latest on the first `keras_adashift.AdaShift`.
"""

import importlib
import sys
import warnings
from typing import TYPE_CHECKING

__version__ = "0.3.0"  # the only place; pyproject.toml reads it statically
__all__ = ["AdaShift"]

if TYPE_CHECKING:
    from keras_adashift.adashift import AdaShift


def __getattr__(name):
    if name == "AdaShift":
        from keras_adashift.adashift import AdaShift

        return AdaShift
    if name == "StepMonitor":  # keras_adashift.callbacks imports Keras
        from keras_adashift.callbacks import StepMonitor

        return StepMonitor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})


def _register():
    """Imports keras_adashift.adashift, which registers AdaShift."""
    try:
        importlib.import_module("keras_adashift.adashift")
    except Exception as error:  # `import keras` must not fail because of us
        warnings.warn(
            f"keras_adashift could not register AdaShift with Keras "
            f"({error!r}); `keras_adashift.AdaShift` raises the error again.",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisteringLoader:
    """Keras's own loader, then `_register()`; leaves no trace on keras."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        if name == "_loader":
            raise AttributeError(name)
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__spec__.loader = module.__loader__ = self._loader
        _register()


class _RegisterWhenKerasIsImported:
    """A meta path finder that wraps the loader of `keras`, nothing else.

    It stays on `sys.meta_path` (removing it during an import could make the
    import system skip a finder); once Keras is in `sys.modules` it is not
    asked again, and a repeated `_register()` is a no-op.
    """

    _busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "keras" or self._busy:
            return None
        self._busy = True  # another finder may ask sys.meta_path again
        try:
            for finder in list(sys.meta_path):
                find_spec = getattr(finder, "find_spec", None)
                if finder is self or find_spec is None:
                    continue
                spec = find_spec(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
        finally:
            self._busy = False
        if getattr(spec.loader, "exec_module", None) is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def _remove_hook():
    sys.meta_path[:] = [
        f for f in sys.meta_path
        if not getattr(f, "_keras_adashift_hook", False)
    ]


if "keras" in sys.modules:
    from keras_adashift.adashift import AdaShift  # noqa: F811
else:
    _remove_hook()  # at most one, if this module is reloaded
    _hook = _RegisterWhenKerasIsImported()
    _hook._keras_adashift_hook = True
    sys.meta_path.insert(0, _hook)
    del _hook
