"""Build and load the small C kernels of `actsparse.speed.kernels` at first use.

Each kernel is a C source string compiled with the system C compiler (`$CC`, else `cc` or `gcc`)
into a shared library cached under `$ACTSPARSE_CACHE/kernels` (default `~/.cache/actsparse/speed/kernels`),
keyed by a hash of source, flags, the compiler's identity and version, and the CPU's features (not
the host name: a container on the same machine reuses the build), and called through ctypes (no
torch headers needed). `-march=native` is safe because the key holds the CPU features. OpenMP
resolves to the `libgomp.so.1` that torch has already loaded, so both share one thread pool.

`ACTSPARSE_NO_CKERNEL=1`, a missing compiler or a failed build give None: callers fall back to
PyTorch, and the reason is logged once per process (warning). A failed build is remembered on disk
beside where the library would be (`NAME_KEY.failed`, holding the compiler's message), so that other
processes and Ray workers do not retry it; delete that file (or change compiler) to try again.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["FLAGS", "VECTORS", "cache_dir", "kernel_dir", "load"]

VECTORS = r"""
#include <stdint.h>
#include <string.h>
#define VL 16
typedef float vf __attribute__((vector_size(64), aligned(4), may_alias)); /* 16 floats, unaligned */
typedef uint16_t vh __attribute__((vector_size(32), aligned(2), may_alias)); /* 16 bfloat16 */
typedef uint32_t vu __attribute__((vector_size(64)));

static inline float bf(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t to_bf(float f) { /* round to nearest even, as torch does (NaN stays NaN) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
"""
"""C source the CPU decode kernels share: 16-float vectors and bfloat16 to and from float32."""

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", *os.environ.get("ACTSPARSE_CFLAGS", "").split())
"""`$ACTSPARSE_CFLAGS` adds flags, e.g. `-mno-avx512f` to build and test the AVX2 paths on an AVX-512 CPU."""
TIMEOUT = 300
"""Seconds one build may take."""

log = logging.getLogger(__name__)

_loaded: dict[str, ctypes.CDLL | None] = {}


def cache_dir() -> Path:
    """Where actsparse keeps what it builds or converts: $ACTSPARSE_CACHE or ~/.cache/actsparse."""
    return Path(os.environ.get("ACTSPARSE_CACHE", Path.home() / ".cache" / "actsparse"))


def kernel_dir() -> Path:
    """Where built kernels (and the record of failed builds) are kept."""
    return cache_dir() / "kernels"


class BuildError(Exception):
    """A kernel cannot be built here; the message says why (the compiler's own words included)."""


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


@functools.cache
def _compiler_identity(compiler: str) -> str:
    """The compiler's resolved path and `--version` banner: a new compiler means a new build."""
    try:
        banner = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        banner = ""
    return f"{os.path.realpath(compiler)}\n{banner}"


@functools.cache
def _cpu_features() -> str:
    """The CPU's architecture and feature flags (what `-march=native` compiles for)."""
    features = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features", "model name")):  # x86 | ARM | the model, either way
                features += line.split(":", 1)[-1].strip() + "\n"
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        features = platform.processor()
    return f"{platform.machine()}\n{features}"


def build_key(name: str, source: str, flags: tuple[str, ...], compiler: str) -> str:
    """The file stem of a build: kernel name and a hash of source, flags, compiler and CPU features."""
    key = "\0".join([source, " ".join(flags), _compiler_identity(compiler), _cpu_features()])
    return f"{name}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _compile(name: str, source: str, flags: tuple[str, ...]) -> Path:
    """The built library of `source` (built now if needed); BuildError says why there is none."""
    compiler = _compiler()
    if compiler is None:
        raise BuildError(f"no C compiler found (${{CC}}={os.environ.get('CC', 'cc')!r}, cc, gcc)")
    stem = build_key(name, source, flags, compiler)
    path, failed = kernel_dir() / f"{stem}.so", kernel_dir() / f"{stem}.failed"
    if path.exists():
        return path
    if failed.exists():
        raise BuildError(f"an earlier build failed (delete {failed} to retry): {failed.read_text(errors='replace')}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # same filesystem: os.replace is atomic
        src, built = Path(tmp) / f"{name}.c", Path(tmp) / f"{name}.so"
        src.write_text(source)
        command = [compiler, *flags, str(src), "-o", str(built)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT)
            message = "" if result.returncode == 0 else _reason(compiler, flags, result.stderr or result.stdout)
        except subprocess.TimeoutExpired:
            message = f"{compiler} took more than {TIMEOUT} s"
        if message:
            record = Path(tmp) / f"{stem}.failed"
            record.write_text(message)
            os.replace(record, failed)  # every process after this one falls back at once
            raise BuildError(message)
        os.replace(built, path)  # concurrent first uses never see a partial file
    return path


def _reason(compiler: str, flags: tuple[str, ...], output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    text = "\n".join(lines[:20]) or "(no output)"
    openmp = "-fopenmp" in flags and ("fopenmp" in output or "omp.h" in output)
    what = "does not support OpenMP (-fopenmp)" if openmp else "failed"
    return f"{os.path.basename(compiler)} {what}: {text}"


def load(
    name: str, source: str, declare: Callable[[ctypes.CDLL], None], flags: tuple[str, ...] = FLAGS
) -> ctypes.CDLL | None:
    """The library built from `source` (once per process), with `declare(lib)` setting its signatures.

    None when C kernels are disabled or cannot be built here; the reason is logged once.
    """
    if name not in _loaded:
        lib = None
        if os.environ.get("ACTSPARSE_NO_CKERNEL") != "1":
            try:
                lib = ctypes.CDLL(str(_compile(name, source, flags)))
                declare(lib)
            except (BuildError, OSError, AttributeError, subprocess.SubprocessError) as err:
                log.warning("C kernel %r unavailable, falling back to PyTorch: %s", name, err)
                lib = None
        _loaded[name] = lib
    return _loaded[name]
