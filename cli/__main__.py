"""``python -m secateur.cli``: the ``secateur`` command."""

import sys

from secateur.cli.main import main

sys.exit(main())
