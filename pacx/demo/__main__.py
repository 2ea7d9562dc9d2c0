"""``python -m pacx.demo``: see :mod:`pacx.demo`."""

import sys

from pacx.demo import main

sys.exit(main())
