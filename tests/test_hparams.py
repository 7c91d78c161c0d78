"""Hyper-parameters read as data: the same values OmegaConf resolves, in bounded time and memory on hostile cfgs."""

import json
import os
import resource
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from streamconv.demo import SyntheticModel, make_checkpoint, nemo_config
from streamconv.sources import open_checkpoint
from streamconv.sources.hparams import Config
from tests.test_cli import assert_one_line_error
from tests.writers import make_nemo

SMALL = SyntheticModel(n_embd=32, n_layer=2, n_head=2, vocab_size=256)
TIMEOUT = 60  # seconds; each of these runs takes about one
MEMORY = 2 * 2**30  # address space of the child: the hostile inputs below reached 1.5 to 3.6 GB of RSS before


def run_bounded(*args: str) -> subprocess.CompletedProcess:
    """`python -m streamconv ARGS` with a time limit and a cap on its address space."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))

    command = [sys.executable, "-m", "streamconv", "--quiet", "--vocab-size", str(SMALL.vocab_size), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, preexec_fn=cap,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def scalars(node, prefix=""):
    """Dotted key -> value of every scalar in a resolved OmegaConf container."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for key, value in items:
        dotted = f"{prefix}{key}"
        if isinstance(value, dict | list):
            yield from scalars(value, dotted + ".")
        else:
            yield dotted, value


def resolvable(root, base: str | None = None) -> dict:
    """What OmegaConf resolves for each scalar key of the cfg at `base` under `root` (the test cfg's one
    resolver left out)."""
    plain = OmegaConf.to_container(root, resolve=False)
    (plain[base] if base else plain)["optim"]["sched"].pop("min_lr")
    resolved = OmegaConf.to_container(OmegaConf.create(plain), resolve=True)
    return dict(scalars(resolved[base] if base else resolved))


def with_hparams(path, hyper_parameters) -> str:
    """A small .ckpt written by torch.save whose hyper_parameters are replaced."""
    make_checkpoint(path, SMALL, optimizer=False)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["hyper_parameters"] = hyper_parameters
    torch.save(checkpoint, path)
    return str(path)


def with_cfg_yaml(tmp_path, text: str) -> str:
    """An extracted .nemo whose model_config.yaml is `text`."""
    folder = tmp_path / "extracted"
    make_nemo(folder, SMALL, extracted=True)
    (folder / "model_config.yaml").write_text(text)
    return str(folder)


def test_a_pickled_cfg_reads_as_omegaconf_resolves_it(tmp_path):
    hyper_parameters = nemo_config(SMALL, "bf16")
    hyper_parameters.cfg.nested = {"ref": "${..hidden_size}", "text": "h=${..hidden_size}, l=${..num_layers}",
                                   "items": [1, "${.0}"], "absolute": "${cfg.num_layers}", "escaped": r"\${x}"}
    path = with_hparams(tmp_path / "in.ckpt", hyper_parameters)
    expected = resolvable(hyper_parameters, "cfg")
    assert expected["max_position_embeddings"] == SMALL.n_positions and expected["nested.text"] == "h=32, l=2"
    with open_checkpoint(path) as checkpoint:
        assert {key: checkpoint.hparams.get(key) for key in expected} == expected
        assert checkpoint.hparam("not_there", 7) == 7
        with pytest.raises(Exception, match="resolver 'multiply'"):
            checkpoint.hparam("optim.sched.min_lr")


def test_a_yaml_cfg_reads_as_omegaconf_resolves_it(tmp_path):
    folder = tmp_path / "extracted"
    make_nemo(folder, SMALL, extracted=True)
    cfg = OmegaConf.load(folder / "model_config.yaml")
    expected = resolvable(cfg)
    with open_checkpoint(folder) as checkpoint:
        assert {key: checkpoint.hparams.get(key) for key in expected} == expected


BOMB = "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(9))
BOMB = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n' + BOMB  # 9**10 strings


def test_a_yaml_alias_bomb_beside_the_cfg_is_never_expanded(tmp_path):
    folder = tmp_path / "extracted"
    make_nemo(folder, SMALL, extracted=True)
    text = (folder / "model_config.yaml").read_text()
    (folder / "model_config.yaml").write_text(text + "bomb:\n" + "".join(f"  {line}\n" for line in BOMB.splitlines()))
    proc = run_bounded("--checkpoint-path", folder, "--save-path", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_embd"] == SMALL.n_embd


def test_a_yaml_alias_bomb_as_a_size_is_one_line(tmp_path):
    text = OmegaConf.to_yaml(nemo_config(SMALL, "bf16").cfg).replace("hidden_size: 32", "hidden_size: *j")
    proc = run_bounded("--checkpoint-path", with_cfg_yaml(tmp_path, BOMB + text), "--save-path", tmp_path / "out")
    assert_one_line_error(proc, "'hidden_size'", "a list of 9 items", "not a whole number")
    assert not (tmp_path / "out").exists()


class Applies:
    """Pickles as `func(arg)`: how a hostile pickle makes the unpickler call an allow-listed class."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return (self.func, (self.arg,))


def shared_lists(depth: int) -> list:
    """Nested lists sharing each level twice: 2**depth leaves, a few hundred bytes once pickled (memo)."""
    level: list = ["x"]
    for _ in range(depth):
        level = [level, level]
    return level


@pytest.mark.parametrize("config_class", [DictConfig, ListConfig])
def test_omegaconf_classes_called_on_shared_lists_are_not_walked(tmp_path, config_class):
    path = tmp_path / "in.ckpt"
    make_checkpoint(path, SMALL, optimizer=False)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["loops"] = {"fit_loop": Applies(config_class, shared_lists(40))}  # OmegaConf: 2**40 nodes
    torch.save(checkpoint, path)
    proc = run_bounded("--checkpoint-path", path, "--save-path", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("cfg, fragments", [
    ("${nonexistent}", ["${nonexistent}", "not in the cfg"]),
    ({"hidden_size": "${nonexistent}"}, ["'hidden_size'", "${nonexistent}", "not in the cfg"]),
    ({"hidden_size": "${oc.env:UNSET_STREAMCONV_VARIABLE}"}, ["'hidden_size'", "environment variable", "oc.env"]),
    ({"hidden_size": "${oc.env:HOME}"}, ["'hidden_size'", "environment variable"]),
    ({"hidden_size": "${multiply:2,16}"}, ["'hidden_size'", "resolver 'multiply'"]),
    ({"hidden_size": "${.num_layers}", "num_layers": "${.hidden_size}"}, ["interpolations (a loop?)"]),
    ({"hidden_size": "${...x}"}, ["'hidden_size'", "above the top"]),
    ({"hidden_size": "${.tokenizer}", "tokenizer": {"a": 1}}, ["'hidden_size'", "a mapping of 1 keys"]),
    ({"hidden_size": "x${.tokenizer}", "tokenizer": {"a": 1}}, ["'hidden_size'", "inside the string"]),
    ({"hidden_size": "${.s0}", **{f"s{i}": f"${{.s{i + 1}}}${{.s{i + 1}}}" for i in range(30)}, "s30": "x" * 4000},
     ["'hidden_size'", "longer than 65536"]),
    ({"hidden_size": "${.s0}", **{f"s{i}": f"${{.s{i + 1}}}${{.s{i + 1}}}" for i in range(30)}, "s30": ""},
     ["'hidden_size'", "too many look-ups"]),
    (["a", "list"], ["is a list of 2 items, not a mapping"]),
])
def test_a_cfg_that_cannot_be_read_is_one_line(tmp_path, cfg, fragments):
    config = OmegaConf.create({"cfg": {**nemo_config(SMALL, "bf16").cfg, **cfg} if isinstance(cfg, dict) else cfg})
    path = with_hparams(tmp_path / "in.ckpt", config)
    proc = run_bounded("--checkpoint-path", path, "--save-path", tmp_path / "out")
    assert_one_line_error(proc, *fragments)
    assert os.environ["HOME"] not in proc.stderr.replace(str(tmp_path), "")
    assert not (tmp_path / "out").exists()


def test_a_nemo_without_yaml_reads_the_lightning_cfg_as_data(tmp_path):
    folder = tmp_path / "extracted"
    make_nemo(folder, SMALL, extracted=True)
    os.remove(folder / "model_config.yaml")
    shutil.copy(with_hparams(tmp_path / "in.ckpt", OmegaConf.create({"cfg": "${oc.env:HOME}"})),
                folder / "model_weights.ckpt")
    proc = run_bounded("--checkpoint-path", folder, "--save-path", tmp_path / "out")
    assert_one_line_error(proc, "environment variable")
    assert os.environ["HOME"] not in proc.stderr.replace(str(tmp_path), "")


def test_a_parent_loop_is_never_followed(tmp_path):
    hyper_parameters = nemo_config(SMALL, "bf16")
    hyper_parameters.cfg.max_position_embeddings = "${cfg.encoder_seq_length}"  # absolute: OmegaConf seeks the root
    hyper_parameters.cfg._set_parent(hyper_parameters.cfg)  # cfg is its own parent: a loop
    path = with_hparams(tmp_path / "in.ckpt", hyper_parameters)
    proc = run_bounded("--checkpoint-path", path, "--save-path", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_positions"] == SMALL.n_positions
    with open_checkpoint(path) as checkpoint:
        assert isinstance(checkpoint.hparams, Config)
        assert checkpoint.hparam("max_position_embeddings") == SMALL.n_positions


@pytest.mark.parametrize("cfg, fragments", [
    ({"hidden_size": "${" + " " * 1_000_000}, ["'hidden_size'", "more than 65536 characters"]),  # no backtracking
    ({"hidden_size": 10**400}, ["'hidden_size'", "<an integer of 1329 bits>", "not a whole number"]),
    ({"layernorm_epsilon": 10**400}, ["'layernorm_epsilon'", "not a number"]),
    ({"hidden_size": "a${.big}", "big": 10**5000}, ["'hidden_size'", "inside the string"]),  # str() would raise
])
def test_huge_values_are_one_line(tmp_path, cfg, fragments):
    """Pickled as plain dicts: OmegaConf itself takes minutes to create some of these."""
    plain = OmegaConf.to_container(nemo_config(SMALL, "bf16").cfg)
    path = with_hparams(tmp_path / "in.ckpt", {"cfg": {**plain, **cfg}})
    proc = run_bounded("--checkpoint-path", path, "--save-path", tmp_path / "out")
    assert_one_line_error(proc, *fragments)
    assert len(proc.stderr) < 1000
