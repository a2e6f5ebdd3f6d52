import sys

from ia3.cli import main

sys.exit(main())
