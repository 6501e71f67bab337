"""Test-session settings shared by every test module."""
import os

# `segjax train | eval | predict` use JAX's persistent compilation cache under ~/.cache by default; the tests,
# in-process and in the subprocesses that inherit this environment, must not write there. The test of the
# cache itself (tests/test_compilation_cache.py) points it at a temporary directory.
os.environ["SEGJAX_COMPILATION_CACHE"] = "off"
