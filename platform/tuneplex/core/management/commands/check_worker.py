import time
import uuid

from django.core.management.base import BaseCommand, CommandError

from tuneplex.core import queue
from tuneplex.core.worker_ping import ping_answered


class Command(BaseCommand):
    help = "Send a ping task through the broker and wait until a Celery worker has run it."

    def add_arguments(self, parser):
        parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait")

    def handle(self, *args, **options):
        token = uuid.uuid4().hex
        started = time.monotonic()
        queue.enqueue(queue.PING, token)
        while time.monotonic() - started < options["timeout"]:
            version = ping_answered(token)
            if version is not None:
                elapsed = time.monotonic() - started
                self.stdout.write(f"worker answered in {elapsed:.2f}s (Python {version})")
                return
            time.sleep(0.2)
        raise CommandError(f"no worker ran the ping task within {options['timeout']:.0f}s")
