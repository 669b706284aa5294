"""``python -m med3dvlm``: the ``med3dvlm`` command."""
from med3dvlm.cli import main

raise SystemExit(main())
