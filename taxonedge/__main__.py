import sys

from taxonedge.cli import main

sys.exit(main())
