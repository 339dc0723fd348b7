import sys

from simzss.cli import main

sys.exit(main())
