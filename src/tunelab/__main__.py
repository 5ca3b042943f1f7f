import sys

from tunelab.cli import entry

sys.exit(entry())
