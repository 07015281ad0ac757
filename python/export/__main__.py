"""python -m export --help   (and: python -m export {ensemble,inspect,verify} --help)"""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
