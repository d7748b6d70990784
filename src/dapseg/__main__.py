import sys

from dapseg.cli import main

sys.exit(main())
