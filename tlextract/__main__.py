import sys

from tlextract.cli.main import main

sys.exit(main())
