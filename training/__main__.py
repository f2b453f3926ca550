"""`python -m training ARGS` == `m2pt train ARGS`; the entry point for `torchrun --nproc-per-node N -m training ARGS`."""

import sys

from training.cli import main

sys.exit(main())
