"""Train image classifiers: ``python -m trainer --help``."""
__version__ = "0.1.0"
