"""Defaults shared by the library and the command line; free of heavy imports so that ``robustvit --help`` is fast."""

DEFAULT_EPS = (36 / 255, 72 / 255, 108 / 255)  # l2 radii reported by certificates: the leaderboard's 36/72/108 /255
CURVE_NAME = "certified_accuracy.png"  # the certified-accuracy curve inside a saved model folder
DEFAULT_LICENSE = "apache-2.0"  # the model card's license
DIGITS = "digits"  # dataset name of the embedded scikit-learn digits (robustvit.data), the default dataset
