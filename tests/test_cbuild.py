"""Building the C kernels: a failed build keeps the compiler's words, is remembered on disk and logged
once; the cache key follows the compiler and CPU, not the host name; no compiler means a logged fallback."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from actsparse.models import loading
from actsparse.speed.kernels import cbuild

GOOD = "int answer(void) { return 42; }\n"


@pytest.fixture(autouse=True)
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cbuild, "_loaded", {})
    monkeypatch.setenv("ACTSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ACTSPARSE_NO_CKERNEL", raising=False)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == cbuild.__name__ and r.levelno == logging.WARNING]


def _compiles(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record every compiler run (not `--version`) made through cbuild."""
    calls: list[list[str]] = []
    real = subprocess.run

    def run(command, *args, **kwargs):
        if "--version" not in command:
            calls.append(list(command))
        return real(command, *args, **kwargs)

    monkeypatch.setattr(cbuild.subprocess, "run", run)
    return calls


def test_a_failed_build_keeps_the_message_is_logged_once_and_remembered_on_disk(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = _compiles(monkeypatch)
    caplog.set_level(logging.WARNING, logger=cbuild.__name__)
    assert cbuild.load("broken", "this is not C", lambda lib: None) is None
    assert cbuild.load("broken", "this is not C", lambda lib: None) is None  # same process: no new log
    (message,) = _warnings(caplog)
    assert "'broken' unavailable, falling back to PyTorch" in message and "error" in message
    (failed,) = cbuild.kernel_dir().glob("broken_*.failed")
    assert "error" in failed.read_text()
    assert len(calls) == 1

    monkeypatch.setattr(cbuild, "_loaded", {})  # another process, or a Ray worker, sharing the cache
    caplog.clear()
    assert cbuild.load("broken", "this is not C", lambda lib: None) is None
    assert len(calls) == 1, "the remembered failure is not retried"
    (message,) = _warnings(caplog)
    assert "an earlier build failed" in message and str(failed) in message


def test_a_good_build_loads_and_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _compiles(monkeypatch)
    lib = cbuild.load("answer", GOOD, lambda lib: None)
    assert lib is not None and lib.answer() == 42
    monkeypatch.setattr(cbuild, "_loaded", {})
    assert cbuild.load("answer", GOOD, lambda lib: None) is not None
    assert len(calls) == 1


def test_the_cache_key_follows_compiler_and_cpu_not_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    compiler = cbuild._compiler()
    assert compiler is not None
    key = cbuild.build_key("k", GOOD, cbuild.FLAGS, compiler)
    monkeypatch.setattr(cbuild.platform, "node", lambda: "another-container")
    assert cbuild.build_key("k", GOOD, cbuild.FLAGS, compiler) == key
    monkeypatch.setattr(cbuild, "_compiler_identity", lambda c: "gcc 99.1")
    assert cbuild.build_key("k", GOOD, cbuild.FLAGS, compiler) != key
    monkeypatch.undo()
    monkeypatch.setattr(cbuild, "_cpu_features", lambda: "x86_64\nsse2")
    assert cbuild.build_key("k", GOOD, cbuild.FLAGS, compiler) != key
    assert cbuild.build_key("k", GOOD, ("-O2",), compiler) != cbuild.build_key("k", GOOD, cbuild.FLAGS, compiler)


def test_no_compiler_falls_back_with_a_logged_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=cbuild.__name__)
    monkeypatch.setattr(cbuild.shutil, "which", lambda name: None)
    assert cbuild.load("answer", GOOD, lambda lib: None) is None
    assert cbuild.load("answer", GOOD, lambda lib: None) is None
    (message,) = _warnings(caplog)
    assert "no C compiler found" in message


def test_a_compiler_without_openmp_falls_back_with_a_logged_reason(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    fake = tmp_path / "fakecc"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "fakecc 1.0"; exit 0; fi\n'
        "echo \"fakecc: error: unsupported option '-fopenmp'\" >&2\nexit 1\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(fake))
    caplog.set_level(logging.WARNING, logger=cbuild.__name__)
    assert cbuild.load("answer", GOOD, lambda lib: None) is None
    (message,) = _warnings(caplog)
    assert "fakecc does not support OpenMP (-fopenmp)" in message and "unsupported option" in message


def test_one_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert loading.cache_dir is cbuild.cache_dir
    assert cbuild.kernel_dir() == tmp_path / "cache" / "kernels"
    monkeypatch.delenv("ACTSPARSE_CACHE")
    assert cbuild.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "actsparse"
