"""``python -m loco_timm COMMAND ...`` and ``accelerate launch -m loco_timm train ...``: the ``loco-timm`` command."""
import sys

from .cli import main

if __name__ == '__main__':
    sys.exit(main())
