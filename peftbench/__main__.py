import sys

from peftbench.cli.main import main

sys.exit(main())
