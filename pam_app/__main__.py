"""``python -m pam_app``: the ``pam`` command."""

import sys

from pam_app.cli import main

sys.exit(main())
