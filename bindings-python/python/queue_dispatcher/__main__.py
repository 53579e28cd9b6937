"""`python -m queue_dispatcher worker ...`: the same command line as `queue-dispatcher`."""

import sys

from queue_dispatcher.cli import main

if __name__ == "__main__":
    sys.exit(main())
