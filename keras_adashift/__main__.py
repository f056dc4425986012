import sys

from keras_adashift.cli import main

sys.exit(main())
