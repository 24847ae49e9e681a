import sys

from qtune.cli.main import main

sys.exit(main())
