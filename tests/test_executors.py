"""Executors: Ray tasks give the local results; a worker lost mid-point loses only that point."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import threading
import time
from pathlib import Path

import psutil
import pytest
from tiny import tiny_lm, tiny_sweep_config

from actsparse import cli
from actsparse.study.executors import LocalExecutor, PointLostError, RayExecutor, make_executor
from actsparse.study.store import RunStore
from actsparse.study.sweep import plan, run_sweep

ray = pytest.importorskip("ray")
TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance with 2 CPUs whose workers can import this folder's modules."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), *([saved] if saved else [])])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


config = tiny_sweep_config


def slow(*args) -> None:
    time.sleep(0.02)


def test_ray_sweep_writes_the_summary_of_the_local_sweep_even_when_a_worker_is_killed(ray_instance, tmp_path) -> None:
    model, tokenizer = tiny_lm()
    local = run_sweep(config(tmp_path / "local"), model, tokenizer, show_progress=False)
    handle = model.register_forward_pre_hook(slow)  # the points last long enough to be caught running
    killed: list[int] = []
    stop = threading.Event()

    def kill_one_busy_worker() -> None:
        while not stop.is_set() and not killed:
            for proc in psutil.Process().children(recursive=True):  # only this test's Ray workers
                with contextlib.suppress(psutil.Error):
                    if proc.cmdline()[:1] == ["ray::_call"]:
                        proc.kill()
                        killed.append(proc.pid)
                        break
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_busy_worker)
    killer.start()
    try:
        remote = run_sweep(config(tmp_path / "ray", executor="ray"), model, tokenizer, show_progress=False)
    finally:
        stop.set()
        killer.join()
        handle.remove()
    assert killed, "no busy worker was seen"
    with RunStore.open(tmp_path / "ray") as store:
        assert store.keys() == set(plan(config(tmp_path / "ray")))
    assert remote == local
    files = [json.loads((tmp_path / d / "summary.json").read_text()) for d in ("local", "ray")]
    assert files[0] == files[1]


def die_once(item: int, marks: str, progress) -> int:
    """Kill this worker process the first time it sees `item` (a mark file remembers), else square it."""
    mark = Path(marks) / str(item)
    if not mark.exists():
        mark.touch()
        os._exit(1)
    return item * item


def fail(item: int, context, progress) -> int:
    raise ValueError(f"bad point {item}")


def test_the_driver_resubmits_a_point_whose_worker_died(ray_instance, tmp_path) -> None:
    executor = RayExecutor(max_retries=0, resubmits=1)  # Ray itself does not retry: the driver must
    results = dict(executor.map(die_once, [1, 2], str(tmp_path), lambda n: None))
    assert results == {1: 1, 2: 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]  # each point's first worker died


def test_a_point_lost_too_often_is_an_error_and_an_exception_is_not_retried(ray_instance, tmp_path) -> None:
    with pytest.raises(PointLostError, match="lost 1 times"):
        list(RayExecutor(max_retries=0, resubmits=0).map(die_once, [7], str(tmp_path), lambda n: None))
    with pytest.raises(ValueError, match="bad point 5"):
        list(RayExecutor().map(fail, [5], None, lambda n: None))


def env_var(item: str, context, progress) -> str | None:
    return os.environ.get(item)


def test_each_task_gets_the_runtime_environment(ray_instance) -> None:
    executor = RayExecutor(runtime_env={"env_vars": {"ACTSPARSE_RAY_CHECK": "on"}})
    assert dict(executor.map(env_var, ["ACTSPARSE_RAY_CHECK"], None, lambda n: None)) == {"ACTSPARSE_RAY_CHECK": "on"}
    assert dict(RayExecutor().map(env_var, ["ACTSPARSE_RAY_CHECK"], None, lambda n: None)) == {
        "ACTSPARSE_RAY_CHECK": None
    }


def test_runtime_env_on_the_command_line(tmp_path) -> None:
    from actsparse.cli.sweep import _runtime_env

    assert _runtime_env('{"env_vars": {"A": "1"}}') == {"env_vars": {"A": "1"}}
    (tmp_path / "env.json").write_text('{"pip": ["actsparse"]}')
    assert _runtime_env(str(tmp_path / "env.json")) == {"pip": ["actsparse"]}
    for bad in ("[1, 2]", "{pip"):
        with pytest.raises(argparse.ArgumentTypeError, match="runtime-env"):
            _runtime_env(bad)
    assert cli.main(["sweep", "--out", str(tmp_path / "run"), "--runtime-env", '{"pip": []}']) == 2  # local: refused


def test_make_executor() -> None:
    assert isinstance(make_executor("local"), LocalExecutor)
    assert make_executor("ray", "ray://head:10001", 1).gpus == 1
    with pytest.raises(ValueError, match="need --executor ray"):
        make_executor("local", gpus_per_point=1)
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        make_executor("dask")


@pytest.mark.slow
def test_cli_ray_sweep_loads_the_named_model_in_each_worker_with_a_device_map(ray_instance, tmp_path, capsys) -> None:
    model, tokenizer = tiny_lm()
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    common = ["sweep", "--model", str(tmp_path / "model"), "--targets", "intermediate", "--values", "0.9,0.5"]
    common += ["--tasks", "arc_easy", "--limit", "6", "--resamples", "20", "--no-progress", "--device-map", "auto"]
    assert cli.main([*common, "--out", str(tmp_path / "local")]) == 0
    assert cli.main([*common, "--out", str(tmp_path / "ray"), "--executor", "ray", "--search", "bisect"]) == 0
    assert "bisection evaluated" in capsys.readouterr().err
    local, remote = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("local", "ray"))
    assert remote["dense"] == local["dense"] and remote["search"]["method"] == "bisect"
    mine = {p["value"]: p for p in remote["points"]}
    for point in local["points"]:  # the values both runs evaluated gave the same point
        if point["value"] in mine:
            assert mine[point["value"]]["scores"] == point["scores"]
            assert mine[point["value"]]["sparsity"] == pytest.approx(point["sparsity"])
