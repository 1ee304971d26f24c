"""Merge configs: mergekit's format, our parameters, and errors that name the key."""

from __future__ import annotations

import copy

import pytest
import torch

from mtmerge import cli
from mtmerge.merging import MergeConfig, load_config
from mtmerge.merging.config import resolve_setting
from tests.merging.conftest import config


@pytest.fixture
def paths(tmp_path):
    for name in ("base", "a", "b"):
        (tmp_path / name).mkdir()
    return tmp_path / "base", [tmp_path / "a", tmp_path / "b"]


def _bad(cfg: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MergeConfig.from_dict(cfg)


def test_mergekit_yaml_parses_with_filters_and_base_in_models(paths, tmp_path):
    base, (a, b) = paths
    text = f"""
merge_method: ties
base_model: {base}
models:
  - model: {base}
  - model: {a}
    parameters:
      weight: 1.0
      density:
        - filter: mlp
          value: 0.3
        - value: 0.6
  - model: {b}
    parameters: {{weight: 0.5}}
parameters:
  density: 0.8
  lambda: 1.2
  normalize: false
  int8_mask: true
dtype: bfloat16
out_dtype: float16
"""
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    for cfg in (load_config(str(path)), load_config(path), load_config(text)):
        assert cfg.merge_method == "ties"
        assert cfg.num_tasks == 2  # the base listed among the models is not a task (mergekit)
        assert cfg.densities("model.layers.0.mlp.up_proj.weight") == [0.3, 0.8]  # model filter, then top level
        assert cfg.densities("model.layers.0.self_attn.q_proj.weight") == [0.6, 0.8]
        assert cfg.weights("x") == [1.0, 0.5]
        assert cfg.lam("x") == 1.2 and cfg.normalize("x") is False
        assert cfg.dtype == torch.bfloat16 and cfg.out_dtype == torch.float16
        assert cfg.flavor == "mergekit" and cfg.scope == "tensor" and cfg.seed == 0
        assert "merge_method: ties" in cfg.text


def test_defaults_follow_mergekits_registry(paths):
    base, models = paths
    expect = {"task_arithmetic": (False, "none"), "ties": (True, "none"), "dare_ties": (False, "l1"),
              "dare_linear": (False, "l1"), "consensus_ties": (True, "none"),
              "consensus_task_arithmetic": (False, "none")}
    for method, (normalize, rescale) in expect.items():
        cfg = MergeConfig.from_dict({"merge_method": method, "base_model": str(base),
                                     "models": [{"model": str(m)} for m in models]})
        assert cfg.normalize("t") is normalize
        assert cfg.rescale("t") == rescale
        assert cfg.weights("t") == [1.0, 1.0] and cfg.densities("t") == [1.0, 1.0] and cfg.lam("t") == 1.0
    cfg = MergeConfig.from_dict({**config("dare_ties", base, models), "parameters": {"rescale": "inverse"}})
    assert cfg.rescale("t") == "inverse"
    cfg = MergeConfig.from_dict({**config("consensus_ties", base, models), "parameters": {"k": 1}})
    assert cfg.k == 1 and cfg.tall_lambda == 0.4


def test_filter_semantics_first_match_wins_and_star():
    setting = ((None if f == "*" else f, v) for f, v in [("mlp", 1.0), ("up", 2.0), ("*", 3.0)])
    setting = tuple(setting)
    assert resolve_setting(setting, "layers.0.mlp.up_proj") == 1.0
    assert resolve_setting(setting, "layers.0.up_proj") == 2.0
    assert resolve_setting(setting, "norm") == 3.0
    assert resolve_setting((("mlp", 1.0),), "norm") is None


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda c: c["models"][1]["parameters"].update(densty=0.5), r"unknown key 'models\[1\]\.parameters\.densty'"),
    (lambda c: c.update(foo=1), r"unknown key 'foo'"),
    (lambda c: c.update(parameters={"lamda": 1.0}), r"unknown key 'parameters\.lamda'"),
    (lambda c: c["models"][0].update(lora="x"), r"unknown key 'models\[0\]\.lora'"),
    (lambda c: c["models"][0]["parameters"].update(density=[{"filter": "mlp", "valu": 1}]),
     r"unknown key 'models\[0\]\.parameters\.density\[0\]\.valu'"),
    (lambda c: c.update(slices=[]), r"'slices': mergekit's slices is not supported"),
    (lambda c: c.update(tokenizer_source="union"), r"tokenizer_source.*not supported"),
    (lambda c: c.update(merge_method="slerp"), r"merge_method must be one of"),
    (lambda c: c.pop("base_model"), r"base_model is required"),
    (lambda c: c.update(models=[]), r"models must be a non-empty list"),
    (lambda c: c["models"][0]["parameters"].update(density=1.5), r"models\[0\]\.parameters\.density must be in"),
    (lambda c: c["models"][0]["parameters"].update(weight="heavy"), r"weight must be a number"),
    (lambda c: c["models"][0]["parameters"].update(weight=[0.1, 0.9]), r"gradients\) are not supported"),
    (lambda c: c.update(parameters={"scope": "model"}), r"parameters\.scope must be"),
    (lambda c: c.update(parameters={"flavor": "foo"}), r"parameters\.flavor must be one of"),
    (lambda c: c.update(parameters={"seed": -1}), r"parameters\.seed"),
    (lambda c: c.update(parameters={"normalize": "yes"}), r"parameters\.normalize must be true or false"),
    (lambda c: c.update(parameters={"k": 2}), r"parameters\.k applies to the consensus methods"),
    (lambda c: c.update(parameters={"rescale": True}), r"parameters\.rescale applies to the DARE methods"),
    (lambda c: c.update(dtype="float64"), r"dtype must be one of"),
    (lambda c: c.update(out_dtype=3), r"out_dtype must be a dtype name"),
    (lambda c: c["models"].append(copy.deepcopy(c["models"][0])), r"models\[2\]\.model is the same checkpoint"),
    (lambda c: c["models"][1].update(model=c["base_model"]) or c["models"].pop(0), r"nothing to merge"),
    (lambda c: c["models"][0].update(model="org/model+lora"), r"'model\+lora' syntax"),
])
def test_config_errors_name_the_key(paths, mutate, match):
    base, models = paths
    cfg = config("ties", base, models)
    mutate(cfg)
    _bad(cfg, match)


def test_method_specific_errors(paths):
    base, models = paths
    _bad({**config("dare_ties", base, models), "parameters": {"scope": "global"}},
         r"scope: 'global' applies to a magnitude trim")
    cfg = config("ties", base, models, scope="global")
    cfg["models"][0]["parameters"]["density"] = [{"filter": "mlp", "value": 0.1}, {"value": 0.2}]
    _bad(cfg, r"scope 'global' needs one density per model")
    with pytest.raises(ValueError, match="not valid YAML"):
        MergeConfig.from_yaml("merge_method: [ties")
    with pytest.raises(ValueError, match="config is empty"):
        MergeConfig.from_yaml("")
    with pytest.raises(FileNotFoundError):
        load_config("no_such_config.yaml")


def test_cli_reports_config_errors_in_one_line(paths, tmp_path, capsys):
    base, models = paths
    cfg_path = tmp_path / "bad.yaml"
    cfg_path.write_text(f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {models[0]}\n"
                        f"  - model: {models[1]}\n    parameters: {{densty: 0.5}}\n")
    assert cli.main(["merge", str(cfg_path), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("mtmerge merge: error: unknown key 'models[1].parameters.densty' "
                           "(allowed here: weight, density)")
    assert not (tmp_path / "out").exists()
    assert cli.main(["merge", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["merge", str(cfg_path)]) == 1
    assert "-o/--output OUT_DIR is required" in capsys.readouterr().err
