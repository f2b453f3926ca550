import sys

from m2pt_cli.main import main

sys.exit(main())
