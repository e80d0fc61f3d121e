"""Entry point of the local runner's worker process: ``python -m fer_batch.runners.child FD PARENT_PID``.

Kept apart from :mod:`fer_batch.runners.worker` (which the package imports) so that ``-m`` runs
a module that is not imported yet.
"""

import sys

from fer_batch.runners.worker import child_main

if __name__ == "__main__":
    sys.exit(child_main(int(sys.argv[1]), int(sys.argv[2])))
