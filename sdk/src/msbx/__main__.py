import sys

from msbx.cli import main

sys.exit(main())
