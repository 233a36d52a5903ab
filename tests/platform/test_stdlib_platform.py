"""`platform` is a standard-library module; our platform/ folder must never shadow it."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STDLIB = sysconfig.get_paths()["stdlib"]

CHECK = ("import platform, sys; assert platform.__file__.startswith(sys.argv[1]), platform.__file__; "
         "print(platform.python_version(), platform.system())")


def _run(args: list[str]) -> subprocess.CompletedProcess:
    environ = dict(os.environ, DJANGO_SETTINGS_MODULE="tuneplex.settings")
    return subprocess.run(args, cwd=REPO, env=environ, capture_output=True, text=True, timeout=120)


def test_pytest_sees_the_stdlib_module():
    import platform

    assert platform.__file__.startswith(STDLIB)
    assert platform.python_version() == ".".join(map(str, sys.version_info[:3]))


def test_manage_py_sees_the_stdlib_module():
    result = _run([sys.executable, "manage.py", "shell", "-c",
                   "import platform, sysconfig; "
                   "assert platform.__file__.startswith(sysconfig.get_paths()['stdlib']); "
                   "print('ok', platform.system())"])
    assert result.returncode == 0, result.stderr
    assert "ok Linux" in result.stdout


def test_the_asgi_app_sees_the_stdlib_module():
    result = _run([sys.executable, "-c",
                   "import tuneplex.asgi; " + CHECK.replace("sys.argv[1]", repr(STDLIB))])
    assert result.returncode == 0, result.stderr


def test_the_celery_app_sees_the_stdlib_module():
    # The worker itself is exercised end to end by tests/e2e (its ping task calls platform).
    result = _run([sys.executable, "-c",
                   "from jobs.celery import app; app.loader.import_default_modules(); "
                   "import jobs.tasks; " + CHECK.replace("sys.argv[1]", repr(STDLIB))])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("cwd", [REPO, REPO / "platform"])
def test_no_platform_package_shadows_it_from_any_working_directory(cwd):
    result = subprocess.run([sys.executable, "-c", CHECK, STDLIB], cwd=cwd, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert not (REPO / "platform" / "__init__.py").exists()
