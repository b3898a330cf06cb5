"""`python -m tritium.cli ...`, as the `tritium` command."""

import sys

from tritium.cli import main

sys.exit(main())
