"""``python -m stillroom.services.cli``: the ``stillroom`` command."""

import sys

from stillroom.services.cli import main

sys.exit(main())
