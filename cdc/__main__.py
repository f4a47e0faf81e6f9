"""``python -m cdc`` is the ``cdc`` command."""

import gc

# The command line's own imports (typer, rich) with the cyclic collector off: they
# allocate many objects and free none (see cdc.cli.app._startup_imports).
gc.disable()
from cdc.cli import main  # noqa: E402

gc.enable()
main()
