"""
``python -m wsgate.worker INDEX CONFIG LISTENERS``: one worker process of ``workers = N``, started
by the parent (:class:`wsgate.process.pool.WorkerPool`), never by hand.  Only glue: the process
loop is :func:`wsgate.process.worker.run_worker`, the service tree
:func:`wsgate.service.worker_service`.
"""

import sys

from wsgate.process.worker import run_worker
from wsgate.service import worker_service

if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1:], worker_service))
