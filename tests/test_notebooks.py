"""The notebooks in notebooks/ run top to bottom without an error, and what they assert holds.

Each notebook runs in a fresh kernel of this interpreter (a kernelspec written to a temporary
directory, so no installed kernelspec is needed). A cell error, including a failed ``assert`` inside
a notebook, fails the test. Each notebook's last cell prints one ``NOTEBOOK_SUMMARY {json}`` line;
the key results in it are checked again here, so an assertion deleted from a notebook is still caught.
Set ``NOTEBOOK_OUTPUT_DIR`` to keep the executed notebooks (with their pictures) there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "dsv4-jax-tests"
CELL_TIMEOUT_S = 600
SUMMARY = "NOTEBOOK_SUMMARY "
TESTED = ("01_quickstart.ipynb", "02_inside_attention.ipynb", "03_pipeline_fake_devices.ipynb", "04_parity.ipynb")


@pytest.fixture(scope="module")
def kernel_manager_factory(tmp_path_factory):
    """Kernel managers that start ``sys.executable -m ipykernel_launcher`` with this test's environment."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path_factory.mktemp("kernels")
    spec_dir = kernels / KERNEL
    spec_dir.mkdir()
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "dsv4_jax tests", "language": "python",
            "env": {"JAX_PLATFORMS": "cpu",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernels)])
    return lambda: KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def run_notebook(name: str, make_kernel_manager) -> dict:
    """Execute notebooks/<name> top to bottom; returns the JSON summary its last cell prints."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(nb, km=make_kernel_manager(), timeout=CELL_TIMEOUT_S,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute()
    finally:
        out_dir = os.environ.get("NOTEBOOK_OUTPUT_DIR")
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, Path(out_dir) / name)
    lines = [line for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
             if out.get("output_type") == "stream" for line in out.get("text", "").splitlines()
             if line.startswith(SUMMARY)]
    assert len(lines) == 1, f"{name} printed {len(lines)} summary lines, expected 1"
    return json.loads(lines[0][len(SUMMARY):])


def test_every_notebook_is_tested_and_stored_without_outputs():
    """Every notebook has a test below; notebooks are kept small in git: no outputs, no execution counts."""
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(TESTED)
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has stored outputs"


def test_quickstart(kernel_manager_factory):
    s = run_notebook("01_quickstart.ipynb", kernel_manager_factory)
    assert len(s["greedy_tokens"]) > 0
    assert s["greedy_tokens"] == s["stateless_argmax"] == s["streamed_tokens"] == s["top1_tokens"]
    assert s["topk5_max_rank"] < 5
    assert s["batch_row0_tokens"] == s["greedy_tokens"][:len(s["batch_row0_tokens"])]


def test_inside_attention(kernel_manager_factory):
    s = run_notebook("02_inside_attention.ipynb", kernel_manager_factory)
    assert s["window_matches_definition"] and s["csa_layers"]
    for picks in s["picks_per_query"].values():  # every query reads min(top-k, complete entries) entries
        assert picks == [min(s["topk"], v) for v in s["visible_csa_entries"]]
    assert max(s["visible_csa_entries"]) > s["topk"]  # the prompt is long enough for the top-k to choose
    assert s["comb_column_sum_error"] < 1e-4


def test_pipeline_fake_devices(kernel_manager_factory):
    s = run_notebook("03_pipeline_fake_devices.ipynb", kernel_manager_factory)
    assert s["devices"] == 4
    assert set(s["pipeline"]) == {"1", "2", "4"}
    for res in s["pipeline"].values():
        assert res["tokens"] == s["engine_tokens"] and res["logits_rel_err"] < 1e-6
    assert [len(s["pipeline"][pp]["stages"]) for pp in ("1", "2", "4")] == [1, 2, 4]
    for c in s["metadata"].values():  # built once, before any layer / stage work, never inside one
        assert c["metadata_eqns"] == c["one_build_metadata_eqns"] and c["metadata_inside_layers"] == 0
        assert c["last_metadata"] < c["first_layer"]


def test_parity(kernel_manager_factory):
    s = run_notebook("04_parity.ipynb", kernel_manager_factory)
    errors = s["errors"]
    assert len(errors) == s["layers"] + 2  # embeddings, layers 0..L-2, final norm, logits: all the reference returns
    assert all(err < 1e-5 for err in errors.values()), errors
    assert s["logits_rel_err"] < 1e-5 and s["argmax_equal"]
    assert s["topk_selections"] > 0 and s["topk_boundary_gap"] > 0
