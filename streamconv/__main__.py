import sys

from streamconv.cli import main

sys.exit(main())
