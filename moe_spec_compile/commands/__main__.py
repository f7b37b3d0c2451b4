"""`python -m moe_spec_compile.commands COMMAND ...`, the same as `moespec COMMAND ...`.

argv -> moe_spec_compile.commands.main -> the exit status
"""

import sys

from . import main

sys.exit(main())
