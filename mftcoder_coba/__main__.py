"""``python -m mftcoder_coba`` is the same as the ``mftcoder-coba`` console command."""
import sys

from mftcoder_coba.cli import main

sys.exit(main())
