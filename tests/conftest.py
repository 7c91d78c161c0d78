import os
import subprocess
import sys

import pytest
import torch

from streamconv.demo import SyntheticModel, make_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Synthetic checkpoints made once per session, keyed by a name."""
    made = {}
    root = tmp_path_factory.mktemp("checkpoints")

    def get(name: str, model: SyntheticModel | None = None, **kwargs):
        if name not in made:
            made[name] = make_checkpoint(root / f"{name}.ckpt", model, **kwargs)
        return made[name]

    return get


@pytest.fixture(scope="session")
def mcore_cases(tmp_path_factory):
    """megatron-core checkpoints (tests/mcore_models.py), written into one cache per session: `get(cases)` maps
    each name of `cases` (name -> parameters) to its written Case, making the missing ones in one child."""
    from tests import mcore_models

    root = tmp_path_factory.mktemp("mcore")

    def get(cases: dict[str, dict]) -> dict:
        return dict(zip(cases, mcore_models.write_many(root, list(cases.values())), strict=True))

    return get


@pytest.fixture(scope="session")
def bf16_ckpt(checkpoints):
    # vocab 1000 is padded to 1024 rows: the slice matters. 8 heads make the QKV regrouping visible.
    return checkpoints("bf16", SyntheticModel(n_embd=64, n_layer=3, n_head=8, vocab_size=1000, n_positions=64),
                       dtype=torch.bfloat16)


@pytest.fixture(scope="session")
def fp32_ckpt(checkpoints):
    return checkpoints("fp32", SyntheticModel(n_embd=96, n_layer=2, n_head=6, n_inner=320, vocab_size=1000,
                                              n_positions=32), dtype=torch.float32, optimizer=False)


def run_cli(*args: str, cwd=None, stdin=None, timeout=None) -> subprocess.CompletedProcess:
    """Run `python -m streamconv ARGS` in a child process and capture its output (killed past `timeout` s)."""
    return subprocess.run(
        [sys.executable, "-m", "streamconv", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, "PYTHONWARNINGS": "ignore"}, stdin=stdin,
        timeout=timeout,
    )
