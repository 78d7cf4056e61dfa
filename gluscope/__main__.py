"""`python -m gluscope ...`, which is also what `torchrun -m gluscope record ...` starts on every rank."""

import sys

from gluscope.cli import main

sys.exit(main())
