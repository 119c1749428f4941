"""``python -m deploy_core.cli``: the same as ``deployctl``."""

from deploy_core.cli import main

main()
