"""``python -m visionserve.service.cli``: the same as the ``visionserve`` command."""

import sys

from . import main

sys.exit(main())
