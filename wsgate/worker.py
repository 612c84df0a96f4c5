"""
``python -m wsgate.worker INDEX CONFIG LISTENERS``: one worker process of ``workers = N``, started
by the parent (:class:`wsgate.workers.WorkerPool`), never by hand.  Only glue: the process loop is
:func:`wsgate.workers.run_worker`, the service tree :func:`wsgate.service.worker_service`.
"""

import sys

from wsgate.service import worker_service
from wsgate.workers import run_worker

if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1:], worker_service))
