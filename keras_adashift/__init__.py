"""AdaShift for Keras 3 (Zhou et al., ICLR 2019)."""

from keras_adashift.adashift import AdaShift

__all__ = ["AdaShift"]
__version__ = "0.2.0"
