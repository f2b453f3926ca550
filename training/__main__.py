"""`python -m training ARGS` == `m2pt train ARGS`; also under `torchrun --nproc-per-node N`."""

import sys

from training.cli import main

sys.exit(main())
