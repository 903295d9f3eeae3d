"""``python -m nbnet`` runs the ``nbnet`` command (see :mod:`nbnet.cli`)."""
import sys

from .cli import main

sys.exit(main())
