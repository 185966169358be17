"""biflow_jax.slurm: SLURM's compressed node lists and tasks-per-node counts, expanded."""

import pytest

from biflow_jax import slurm


def test_nodelist_parser():
    assert slurm.expand_slurm_nodelist("node[01-04,07]") == [
        "node01", "node02", "node03", "node04", "node07"]
    assert slurm.first_slurm_host("node[01-04,07]") == "node01"
    assert slurm.expand_slurm_nodelist("a1,b2") == ["a1", "b2"]
    assert slurm.first_slurm_host("a1,b2") == "a1"
    assert slurm.expand_slurm_nodelist("gpu-[3-5]") == ["gpu-3", "gpu-4", "gpu-5"]
    assert slurm.expand_slurm_nodelist("x[8-10],gpu-[3,5]") == [
        "x8", "x9", "x10", "gpu-3", "gpu-5"]
    assert slurm.expand_slurm_nodelist("r[1-2]-n[1-2]") == ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]
    for bad in ("node[01-04", "node01]", "node[4-2]", "node[a-b]", ""):
        with pytest.raises(ValueError):
            slurm.expand_slurm_nodelist(bad)


def test_tasks_per_node_parser():
    assert slurm.parse_slurm_tasks_per_node("4(x2),2") == [4, 4, 2]
    assert slurm.parse_slurm_tasks_per_node("8") == [8]
    with pytest.raises(ValueError):
        slurm.parse_slurm_tasks_per_node("4(2)")
