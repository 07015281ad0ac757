"""python -m trainer <train|evaluate|prepare|demo-data|models> --help"""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
