"""Kept for old commands: ``python bench/run.py ...`` is ``python -m bench ...`` (see bench/__init__.py)."""

import os
import runpy
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, not bench/
runpy.run_module("bench", run_name="__main__", alter_sys=True)
