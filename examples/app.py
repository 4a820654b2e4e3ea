"""An app for `serve --app examples/app.py`: queue handlers that nodes run, one message at a time each.

python3 nodeflow.py serve --app examples/app.py            # in two or three terminals
python3 nodeflow.py send emails '{"to": "a@b.c"}'          # any node takes it
python3 nodeflow.py send emails '{"to": "fail"}'           # retried with back-off, then a dead letter
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import nodeflow


@nodeflow.handler("emails")
def send_email(message: nodeflow.Message) -> None:
    """A handler that returns acks its message; one that raises is retried, then dead-lettered."""
    if message.body.get("to") == "fail":
        raise RuntimeError("the mail server said no")
    time.sleep(float(message.body.get("seconds", 0.2)))  # the work
    print(f"pid {os.getpid()}: sent an email to {message.body['to']} (delivery {message.attempts})", flush=True)
