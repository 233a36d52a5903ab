"""jobs/training is a plain library: no Django, runnable in the trainer's own environment."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

from django.conf import settings

TRAINING = Path(__file__).resolve().parents[2] / "jobs" / "training"


def test_no_module_in_jobs_training_imports_django_or_the_platform():
    offenders = []
    for path in TRAINING.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names
                          if n.split(".")[0] in ("django", "rest_framework", "tuneplex", "celery")]
    assert not offenders


def test_the_trainer_environment_imports_it_without_django():
    # Run from the repository root, where the platform/ folder could shadow the standard
    # library's `platform` module (torch and transformers call platform.system()).
    code = ("import sys, sysconfig, pathlib, platform, jobs.training.gguf_convert, torch, "
            "transformers, peft; assert 'django' not in sys.modules; "
            "assert pathlib.Path(platform.__file__).parent == "
            "pathlib.Path(sysconfig.get_paths()['stdlib']), platform.__file__; "
            "assert platform.system() == 'Linux'; print(torch.__version__)")
    result = subprocess.run([str(settings.TRAINER_PYTHON), "-c", code], cwd=settings.REPO_DIR,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2.13.0")
