import sys

from sgcl.cli import main

sys.exit(main())
