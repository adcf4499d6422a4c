"""C{python -m mcpgw}: the C{mcpgw} command."""

import sys

from mcpgw.cli import main

sys.exit(main())
