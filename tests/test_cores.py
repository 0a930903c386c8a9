"""The default thread count: one per physical core this process may use, as llama.cpp's tools.

Oracles: a sysfs tree written here (two hyperthreads per core), and util-linux's `lscpu`
reading this machine's own topology."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from dysco_edge.cores import physical_cores


def _sysfs(tmp_path, siblings: dict[int, str]):
    for cpu, shared in siblings.items():
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(shared + "\n")
    return tmp_path


def test_hyperthreads_of_one_core_count_once(tmp_path):
    # 4 cores x 2 threads, numbered as Linux does on x86 (cpu N and N+4 share a core)
    sysfs = _sysfs(tmp_path, {cpu: f"{cpu % 4},{cpu % 4 + 4}" for cpu in range(8)})
    assert physical_cores(sysfs, allowed=range(8)) == 4
    assert physical_cores(sysfs, allowed={0, 4}) == 1  # both threads of one core
    assert physical_cores(sysfs, allowed={0, 1, 5}) == 2


def test_without_topology_falls_back_as_llama_cpp(tmp_path):
    logical = len(os.sched_getaffinity(0))
    assert physical_cores(tmp_path / "none", allowed=range(logical)) == (logical if logical <= 4 else logical // 2)


def test_this_machine_agrees_with_lscpu():
    if shutil.which("lscpu") is None:
        pytest.skip("no lscpu here")
    allowed = os.sched_getaffinity(0)
    rows = subprocess.run(["lscpu", "-p=CPU,CORE,SOCKET"], capture_output=True, text=True, check=True).stdout
    cores = {tuple(line.split(",")[1:]) for line in rows.splitlines()
             if line and not line.startswith("#") and int(line.split(",")[0]) in allowed}
    assert physical_cores() == len(cores)


@pytest.mark.slow
def test_a_model_runs_on_the_physical_cores_unless_told():
    import llama_cpp

    import models
    from dysco_edge import Model
    for asked, expected in ((None, physical_cores()), (1, 1)):
        with Model(models.smollm2_q4_1(), n_ctx=256, n_threads=asked) as model:
            ctx = model.engine.ctx
            assert (llama_cpp.llama_n_threads(ctx), llama_cpp.llama_n_threads_batch(ctx)) == (expected, expected)
            assert f"({expected} thread" in model.where()
