"""python -m batch --bundle BUNDLE --images DIR|LIST|TABLE --out OUT   (python -m batch --help)"""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
