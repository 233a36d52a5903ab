"""llama.cpp for the exports: its own converters and quantizer, and its runtime for the checks.

Both come from one pinned llama-cpp-python (pyproject.toml, deploy/setup.sh): the
runtime is the package, compiled once at set-up for the CPU and kept in pip's wheel cache; the
converters are the scripts of the llama.cpp it vendors (``convert_hf_to_gguf.py``,
``convert_lora_to_gguf.py``, their ``conversion`` package and the ``gguf-py`` they import first),
extracted from the same sdist into ``<trainer venv>/share/llama.cpp``, so the GGUF files are
written by the converter of the llama.cpp that then reads them (``scripts_dir`` refuses
converters of another release).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

SCRIPTS_ENV = "TUNEPLEX_LLAMA_CPP_SCRIPTS"  # overrides where the converters are looked for
THREADS_ENV = "TUNEPLEX_LLAMA_CPP_THREADS"  # llama.cpp's threads (default: torch's)

# quantization name → llama.cpp's LLAMA_FTYPE_MOSTLY_* (include/llama.h)
FTYPES = {"f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15}


def version() -> str:
    """The llama-cpp-python release whose llama.cpp runs the checks."""
    from importlib.metadata import version as installed

    return installed("llama_cpp_python")


class ConversionFailed(Exception):
    """A llama.cpp converter refused the model or adapter; the message is its last lines."""


def scripts_dir() -> Path:
    """The folder holding llama.cpp's converters (see the module's docstring)."""
    folder = Path(os.environ.get(SCRIPTS_ENV) or Path(sys.prefix) / "share" / "llama.cpp")
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise RuntimeError(f"llama.cpp's converters are not in {folder}: run deploy/setup.sh "
                           f"(or set {SCRIPTS_ENV})")
    stamp = (folder / "VERSION").read_text().strip() if (folder / "VERSION").is_file() else "?"
    if stamp != f"llama-cpp-python=={version()}":
        raise RuntimeError(f"the converters in {folder} are from {stamp}, the runtime is "
                           f"llama-cpp-python=={version()}: run deploy/setup.sh")
    return folder


# what the converters need from the vendored llama.cpp (paths inside it)
SCRIPT_PATHS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/",
                "LICENSE")


def install_scripts(target: Path | None = None) -> Path:
    """Extracts the converters from the sdist of the installed llama-cpp-python release (its
    vendor/llama.cpp) into ``target`` (default: <this environment>/share/llama.cpp)."""
    import tarfile

    target = target or Path(sys.prefix) / "share" / "llama.cpp"
    release = version()
    with tempfile.TemporaryDirectory() as download:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--no-binary=:all:", "--disable-pip-version-check", "--dest", download,
                        f"llama-cpp-python=={release}"], check=True)
        sdist = next(Path(download).glob("llama_cpp_python-*.tar.gz"))
        staging = target.with_name(target.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                parts = member.name.split("/", 3)  # llama_cpp_python-X/vendor/llama.cpp/<path>
                if parts[1:3] != ["vendor", "llama.cpp"] or len(parts) < 4:
                    continue
                if any(parts[3] == p or (p.endswith("/") and parts[3].startswith(p))
                       for p in SCRIPT_PATHS):
                    member.name = parts[3]
                    archive.extract(member, staging, filter="data")
    (staging / "VERSION").write_text(f"llama-cpp-python=={release}\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def convert_model(model_dir: Path, outfile: Path, *, outtype: str = "f16") -> Path:
    """A Hugging Face model directory (weights, config, tokenizer, chat template) as one GGUF
    file, through llama.cpp's convert_hf_to_gguf.py."""
    _run_converter("convert_hf_to_gguf.py",
                   [str(model_dir), "--outfile", str(outfile), "--outtype", outtype])
    return outfile


def convert_lora(adapter_dir: Path, base_dir: Path, outfile: Path, *, outtype: str = "f16") -> Path:
    """A peft LoRA adapter as a GGUF LoRA for ``--lora``, through convert_lora_to_gguf.py (the
    base model's directory gives it the architecture and the tensor names)."""
    _run_converter("convert_lora_to_gguf.py",
                   [str(adapter_dir), "--base", str(base_dir), "--outfile", str(outfile),
                    "--outtype", outtype])
    return outfile


def _run_converter(script: str, args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("NO_LOCAL_GGUF", None)  # the converter must import the gguf-py beside it
    with tempfile.TemporaryFile() as log:
        done = subprocess.run([sys.executable, str(scripts_dir() / script), *args],
                              stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
        if done.returncode != 0:
            log.seek(0)
            tail = log.read().decode("utf-8", "replace").strip().splitlines()[-6:]
            raise ConversionFailed(f"llama.cpp's {script} failed (exit {done.returncode}): "
                                   + " | ".join(tail))


def quantize(source: Path, target: Path, quantization: str) -> Path:
    """``source`` (an f16 GGUF) requantized by llama.cpp's own quantizer (llama_model_quantize,
    the code behind llama-quantize), k-quants' mixtures and fallbacks included."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[quantization]
    params.nthread = threads()
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0 or not target.is_file():
        raise ConversionFailed(f"llama.cpp could not quantize {source.name} to {quantization} "
                               f"(status {status})")
    return target


def threads() -> int:
    """As many as torch uses beside it (OMP_NUM_THREADS, or every core), unless THREADS_ENV says:
    both spin while they wait, so on a busy machine fewer threads can be much faster."""
    import torch

    return int(os.environ.get(THREADS_ENV) or torch.get_num_threads())


class LoadFailed(Exception):
    """llama.cpp could not load the GGUF file (or apply the LoRA)."""


class Model:
    """A GGUF loaded by llama.cpp (optionally with a LoRA GGUF applied): tokenizer, chat template,
    greedy decoding and logits, all computed by llama.cpp itself on the CPU."""

    def __init__(self, gguf: Path, *, lora: Path | None = None, n_ctx: int = 256):
        import llama_cpp

        try:
            with _quiet_stderr():
                self._llama = llama_cpp.Llama(
                    model_path=str(gguf), lora_path=str(lora) if lora else None, n_ctx=n_ctx,
                    n_batch=n_ctx, logits_all=True, verbose=False, seed=0,
                    n_threads=threads())
        except (ValueError, RuntimeError) as exc:
            raise LoadFailed(f"llama.cpp could not load {gguf.name}"
                             + (f" with {lora.name}" if lora else "") + f": {exc}") from exc

    def close(self) -> None:
        self._llama.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._llama.metadata)

    def tokenize(self, text: str) -> list[int]:
        """``text`` in the GGUF's own tokenizer, special tokens parsed, no BOS added."""
        return self._llama.tokenize(text.encode(), add_bos=False, special=True)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """The logits after every token of ``tokens`` (len(tokens) x vocabulary), one pass."""
        self._llama.reset()
        self._llama.eval(list(tokens))
        return np.array(self._llama.scores[: len(tokens)], dtype=np.float32)

    def greedy(self, prompt: Sequence[int], n: int) -> tuple[list[int], np.ndarray]:
        """``n`` tokens after ``prompt``, each the argmax of llama.cpp's logits (no sampler, no
        stop at end of turn: the same chain transformers computes for the comparison), and the
        logits that chose each (n x vocabulary)."""
        self._llama.reset()
        self._llama.eval(list(prompt))
        tokens: list[int] = []
        while True:
            tokens.append(int(np.argmax(self._llama.scores[self._llama.n_tokens - 1])))
            if len(tokens) == n:
                break
            self._llama.eval([tokens[-1]])
        start = len(prompt) - 1
        return tokens, np.array(self._llama.scores[start: start + n], dtype=np.float32)


@contextmanager
def _quiet_stderr():
    """llama.cpp's loader prints to file descriptor 2 whatever ``verbose`` says; keep it off the
    export's stderr unless loading fails."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode("utf-8", "replace")[-4000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


if __name__ == "__main__":  # python -m jobs.export.llamacpp install-scripts [TARGET] (set-up)
    if sys.argv[1:2] != ["install-scripts"]:
        sys.exit("usage: python -m jobs.export.llamacpp install-scripts [TARGET]")
    print(install_scripts(Path(sys.argv[2]) if len(sys.argv) > 2 else None))
