"""Run one vLLM replica for a base model in the foreground (deploy/up.sh starts it).

    manage.py run_engine [--model NAME] [--port PORT]

It listens on 127.0.0.1 only, with runtime LoRA loading on and the pool limits from the
settings (TUNEPLEX_ENGINE_*). SIGTERM or Ctrl-C stops the engine and its helper processes.
"""

from __future__ import annotations

import signal

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from serving.engine import EngineProcess, EngineSpec, EngineStartError
from tuneplex.basemodels.models import BaseModel


class Command(BaseCommand):
    help = "Run one vLLM engine replica for a base model on loopback."

    def add_arguments(self, parser):
        parser.add_argument("--model", default=settings.DEFAULT_BASE_MODEL)
        parser.add_argument("--port", type=int, default=settings.ENGINE_PORT)
        parser.add_argument("--timeout", type=float, default=300.0, help="start-up wait, seconds")

    def handle(self, *args, model: str, port: int, timeout: float, **options):
        base = BaseModel.objects.filter(name=model, enabled=True).first()
        if base is None:
            raise CommandError(f"No enabled base model named {model}; register it first.")
        if not settings.ENGINE_PYTHON.exists():
            raise CommandError(f"No engine environment at {settings.ENGINE_PYTHON}; run deploy/setup.sh.")
        spec = EngineSpec(python=settings.ENGINE_PYTHON, model_dir=base.directory, served_name=base.name,
                          port=port, max_loras=settings.ENGINE_MAX_LORAS,
                          max_cpu_loras=settings.ENGINE_LORA_SLOTS,
                          max_lora_rank=settings.ENGINE_MAX_LORA_RANK,
                          max_model_len=min(settings.ENGINE_MAX_MODEL_LEN, base.max_sequence_length),
                          kv_cache_gib=settings.ENGINE_KV_CACHE_GIB)
        engine = EngineProcess(spec, settings.DATA_DIR / "logs" / f"engine-{port}.log")

        def stop(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)
        engine.start()
        try:
            engine.wait_ready(timeout=timeout)
            self.stdout.write(f"engine for {base.name} ready at {spec.url} (log: {engine.log_path})",
                              ending="\n")
            self.stdout.flush()
            engine.process.wait()
            raise CommandError(f"the engine exited with status {engine.process.returncode}; "
                               f"see {engine.log_path}")
        except EngineStartError as exc:
            raise CommandError(str(exc)) from None
        except KeyboardInterrupt:
            pass
        finally:
            engine.stop()
