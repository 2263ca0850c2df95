"""``python -m outbound_heartbeat``: the same as the ``outbound-heartbeat`` command."""

import sys

from .cli import main

sys.exit(main())
