import sys

from vlmtune.cli.main import main

sys.exit(main())
