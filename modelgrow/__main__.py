"""`python -m modelgrow` is the `modelgrow` command, for environments without the script."""

import os
import sys

# `python -m` puts the current folder first on sys.path, so a *.dist-info folder there
# would load as a plugin (code from wherever the user happens to stand). Plugins come
# from installed distributions only: drop it (modelgrow itself is already imported).
sys.path[:] = [p for p in sys.path if p not in ("", os.getcwd())]

from .cli import run  # noqa: E402 - after the path is made safe

if __name__ == "__main__":
    run()
