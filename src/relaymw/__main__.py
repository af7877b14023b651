"""``python -m relaymw``: the ``relaymw`` command, wherever the console script is not on PATH."""

from __future__ import annotations

import sys

from relaymw.cli import main

sys.exit(main())
