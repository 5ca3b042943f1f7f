"""Tests run on oneDNN where it works (runtime.linear onednn), as the runs they check did before
the kernels were measured per machine: no test measures this machine (a few seconds each time
$TUNELAB_CACHE moves). Tests of `auto` set their own environment."""

import os

os.environ.setdefault("TUNELAB_ONEDNN", "1")
