import sys

from tiesfed.cli import main

sys.exit(main())
