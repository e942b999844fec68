import signal
import sys

from tlextract.cli.main import main

code = main()
# The command has ended and said how; a signal arriving while the process exits (a second
# Ctrl-C) must not turn that into a traceback.
for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
sys.exit(code)
