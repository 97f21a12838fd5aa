"""moto's `moto_server`, with SQS's deletes atomic.

moto 5's `Queue.delete_message` rebuilds the queue's list of messages without the lock
that its `add_message` holds, so two deletes on one queue at the same moment (two
workers settling at once) can put a deleted message back, and a delete beside a send
can drop the message sent. Neither happens on SQS, where a delete that answered
success is final and a send that answered success is kept. This runs `moto_server`
with that method under the queue's own lock; everything else is moto's.

    .venv/bin/python tests/moto_server.py -H 127.0.0.1 -p 5000
"""

import sys

from moto.server import main
from moto.sqs import models

_delete_message = models.Queue.delete_message


def _atomic_delete_message(self, receipt_handle):
    with self._messages_lock:
        return _delete_message(self, receipt_handle)


models.Queue.delete_message = _atomic_delete_message

if __name__ == "__main__":
    sys.exit(main())
