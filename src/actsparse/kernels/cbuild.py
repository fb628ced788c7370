"""Build and load the small C kernels of `actsparse.kernels` at first use.

Each kernel is a C source string compiled with the system C compiler (`$CC`, else `cc` or `gcc`)
into a shared library cached under `$ACTSPARSE_CACHE/kernels` (default `~/.cache/actsparse/kernels`),
keyed by a hash of source, flags and machine, and called through ctypes (no torch headers needed).
`-march=native` is safe because the library is built on the machine that runs it. OpenMP resolves
to the `libgomp.so.1` that torch has already loaded, so both share one thread pool.
`ACTSPARSE_NO_CKERNEL=1`, a missing compiler or a failed build give None: callers fall back to PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["FLAGS", "cache_dir", "load"]

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")

_loaded: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    """Where built kernels are kept."""
    return Path(os.environ.get("ACTSPARSE_CACHE", Path.home() / ".cache" / "actsparse")) / "kernels"


def _compile(name: str, source: str, flags: tuple[str, ...]) -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    key = source + " ".join(flags) + platform.node() + platform.machine()
    path = cache_dir() / f"{name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # same filesystem: os.replace is atomic
            src, built = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
            src.write_text(source)
            result = subprocess.run([compiler, *flags, str(src), "-o", str(built)], capture_output=True, timeout=300)
            if result.returncode != 0:
                return None
            os.replace(built, path)  # concurrent first uses never see a partial file
    return path


def load(
    name: str, source: str, declare: Callable[[ctypes.CDLL], None], flags: tuple[str, ...] = FLAGS
) -> ctypes.CDLL | None:
    """The library built from `source` (once per process), with `declare(lib)` setting its signatures.

    None when C kernels are disabled or cannot be built here.
    """
    if name not in _loaded:
        lib = None
        if os.environ.get("ACTSPARSE_NO_CKERNEL") != "1":
            try:
                path = _compile(name, source, flags)
                if path is not None:
                    lib = ctypes.CDLL(str(path))
                    declare(lib)
            except (OSError, AttributeError, subprocess.SubprocessError):  # unwritable cache, broken build
                lib = None
        _loaded[name] = lib
    return _loaded[name]
