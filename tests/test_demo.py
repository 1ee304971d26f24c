"""``mtmerge demo`` (the package mtmerge/demo/) in ``--quick`` mode: table structure, sane accuracies, caching;
the multi-task MoE experiment: its table, accuracies above chance, FLOPs per token, mtmerge's ops in training."""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("sklearn")
pytest.importorskip("safetensors")

from mtmerge import demo

QUICK_ROWS = ["pre-trained", *[f"fine-tuned on {t}" for t in demo.QUICK_TASKS], "individual (own fine-tune)",
              *demo.QUICK_METHODS]


def _run(argv: list[str], capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="mtmerge demo")
    demo.add_arguments(parser)
    code = demo.run(parser.parse_args(argv))
    return code, capsys.readouterr().out


def _tables(out: str) -> list[list[str]]:
    """The markdown tables of ``out``: runs of consecutive lines starting with ``|``."""
    tables: list[list[str]] = []
    previous = False
    for line in out.splitlines():
        current = line.startswith("|")
        if current and not previous:
            tables.append([])
        if current:
            tables[-1].append(line)
        previous = current
    return tables


def _parse_table(out: str, index: int = 0) -> tuple[list[str], dict[str, list[str]]]:
    lines = _tables(out)[index]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert re.fullmatch(r"\|( ---:? \|)+", lines[1].strip()), lines[1]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows[cells[0]] = cells
    return header, rows


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> dict:
    """One --quick run into a fresh work dir (trains the checkpoints), shared by the tests."""
    work = tmp_path_factory.mktemp("demo")
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    json_path = work / "result.json"
    buf = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(buf):
        code = demo.run(parser.parse_args(["--quick", "--work-dir", str(work), "--json", str(json_path)]))
    assert torch.get_num_threads() == threads  # run() restores the thread count
    return {"code": code, "out": buf.getvalue(), "work": work, "json": json.loads(json_path.read_text())}


def test_quick_demo_prints_the_table(quick_run):
    assert quick_run["code"] == 0
    out = quick_run["out"]
    assert "checkpoints: training into" in out
    header, rows = _parse_table(out)
    assert header == ["model", "lambda", *demo.QUICK_TASKS, "mean", "normalized", "merge s"]
    assert list(rows) == QUICK_ROWS
    for name, cells in rows.items():
        accs = [float(c) for c in cells[2:-1]]
        assert all(0.0 <= a <= 100.0 for a in accs[:-1]), (name, accs)
        merged = name in demo.QUICK_METHODS
        assert (cells[-1] != "") == merged  # merge seconds only for merges
        assert (cells[1] != "") == merged  # lambda only for merges
    assert rows["average"][1] == "1"
    assert float(rows["individual (own fine-tune)"][-2]) == 100.0
    # the demo's claim: TIES is at least as good as plain averaging ("does NOT beat" is a failure)
    assert re.search(r"TIES (beats|matches) plain averaging", out), [line for line in out.splitlines()
                                                                    if "plain averaging" in line]
    assert "does NOT beat" not in out


def test_quick_demo_accuracies_are_sane(quick_run):
    result = quick_run["json"]
    tasks = list(result["tasks"])
    assert tasks == list(demo.QUICK_TASKS)
    rows = {r["name"]: r for r in result["rows"]}
    base = rows["pre-trained"]["accuracy"]
    chance = {t: 1.0 / demo.TASKS[t].num_classes for t in tasks}
    for t in tasks:
        own = rows[f"fine-tuned on {t}"]["accuracy"][t]
        assert own > base[t], (t, own, base[t])  # every fine-tune beats the base on its own task
        assert own == rows["individual (own fine-tune)"]["accuracy"][t]
        assert base[t] > chance[t]
    for name in demo.QUICK_METHODS:
        row = rows[name]
        assert row["kind"] == "merge"
        for t in tasks:
            assert chance[t] < row["accuracy"][t] <= 1.0, (name, t, row["accuracy"][t])
        assert row["mean"] == pytest.approx(sum(row["accuracy"].values()) / len(tasks))
        individual = rows["individual (own fine-tune)"]["accuracy"]
        assert row["normalized"] == pytest.approx(sum(row["accuracy"][t] / individual[t] for t in tasks) / len(tasks))
        assert row["lam"] in (*demo.LAMBDA_GRID, 1.0)
        assert row["merge_seconds"] > 0
        if row["val_search"] is not None:  # the lambda search's line matches the pipeline's merge at that lambda
            assert row["val_mean"] == pytest.approx(row["val_search"], abs=0.01)
        assert row["config"]["merge_method"] == demo.METHODS[name].merge_method
    assert rows["ties"]["config"]["models"][0]["parameters"]["density"] == 0.2
    assert result["settings_key"] == demo.QUICK_SETTINGS.key()


def test_checkpoints_are_hf_style_and_merges_go_through_the_configs(quick_run):
    from safetensors.torch import load_file

    root = quick_run["work"] / "quick"
    base = load_file(str(root / "base" / "model.safetensors"))
    config = json.loads((root / "base" / "config.json").read_text())
    assert config["mtmerge_demo"]["settings_key"] == demo.QUICK_SETTINGS.key()
    assert set(config["tasks"]) == set(demo.QUICK_TASKS)
    fts = [load_file(str(root / "finetuned" / t / "model.safetensors")) for t in demo.QUICK_TASKS]
    assert any(not torch.equal(fts[0][k], base[k]) for k in base if k.startswith("backbone"))
    # the frozen heads are identical in every checkpoint, so every merge keeps them exactly
    for k in base:
        if k.startswith("heads."):
            assert all(torch.equal(f[k], base[k]) for f in fts)
    # "average": task arithmetic with weights 1/T and lambda 1 is the mean of the fine-tunes
    avg = demo.load_checkpoint(root / "merged" / "average")
    for k in base:
        torch.testing.assert_close(avg[k], sum(f[k] for f in fts) / len(fts), atol=1e-6, rtol=1e-5)
    for name in demo.QUICK_METHODS:
        assert (root / "configs" / f"{name}.yaml").is_file()


def test_second_run_reuses_the_checkpoints(quick_run, capsys):
    code, out = _run(["--quick", "--work-dir", str(quick_run["work"]), "--methods", "ties", "--experiments", "merge"],
                     capsys)
    assert code == 0
    assert "checkpoints: reusing" in out
    _, rows = _parse_table(out)
    assert list(rows)[-1] == "ties"
    first = {r["name"]: r for r in quick_run["json"]["rows"]}
    assert float(rows["ties"][-3]) == pytest.approx(100 * first["ties"]["mean"], abs=0.051)


def test_cache_validity_check(quick_run, tmp_path):
    settings = demo.QUICK_SETTINGS
    expected = {k: v.shape for k, v in demo.build_model(settings).state_dict().items()}
    src = quick_run["work"] / "quick" / "base"
    assert demo._checkpoint_ok(src, settings, expected)
    other = demo.Settings(tasks=settings.tasks, finetune_epochs=settings.finetune_epochs + 1)
    assert not demo._checkpoint_ok(src, other, expected)  # other training settings: retrain
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert not demo._checkpoint_ok(broken, settings, expected)
    assert not demo._checkpoint_ok(tmp_path / "missing", settings, expected)


def test_cli_subcommand(quick_run, capsys):
    from mtmerge import cli

    try:
        cli.build_parser().parse_known_args(["demo"])
    except SystemExit:  # argparse: invalid choice 'demo' -- a broken CLI is a failure, never a skip
        pytest.fail("`mtmerge demo` is not a subcommand of mtmerge/cli.py: " + capsys.readouterr().err[-500:])
    code = cli.main(["demo", "--quick", "--work-dir", str(quick_run["work"]), "--methods", "average",
                     "--experiments", "merge"])
    assert code == 0
    assert "| average | 1 |" in capsys.readouterr().out


def test_settings_key_is_stable_and_sensitive():
    assert demo.Settings().key() == demo.FULL_SETTINGS.key()
    assert demo.Settings(seed=1).key() != demo.FULL_SETTINGS.key()
    assert len(Path(demo.default_work_dir()).parts) > 1


# ---- the multi-task MoE experiment ---------------------------------------------------------------


def test_quick_demo_prints_the_moe_table(quick_run):
    out = quick_run["out"]
    assert len(_tables(out)) == 2  # the merge table, then the MoE table
    header, rows = _parse_table(out, 1)
    assert header == ["model", *demo.QUICK_TASKS, "mean", "block FLOPs/token", "vs dense", "model FLOPs/token",
                      "experts/task", "params", "train s"]
    assert list(rows) == list(demo.MOE_MODELS)
    assert rows["dense"][header.index("vs dense")] == "1.00x"
    assert rows["dense"][header.index("experts/task")] == "-"
    for name in ("shared MoE", "TaskMoE"):
        assert re.fullmatch(r"\d\.\d/8", rows[name][header.index("experts/task")]), rows[name]
        assert re.search(rf"^{name}: \d+\.\dx fewer block FLOPs per token than dense", out, re.M), name
    assert "Serving one task, TaskMoE's tokens used" in out


def test_quick_moe_accuracies_and_flops(quick_run):
    moe = quick_run["json"]["moe"]
    settings = demo.MoESettings(**moe["settings"])
    assert settings == demo.QUICK_MOE_SETTINGS
    assert moe["tasks"] == list(demo.QUICK_TASKS)
    rows = {r["name"]: r for r in moe["rows"]}
    assert list(rows) == list(demo.MOE_MODELS)
    for name, row in rows.items():
        for t in moe["tasks"]:
            chance = 1.0 / demo.TASKS[t].num_classes
            # well above chance: at least halfway from chance to 100%
            assert row["accuracy"][t] > chance + 0.5 * (1 - chance), (name, t, row["accuracy"][t])
        assert row["mean"] == pytest.approx(sum(row["accuracy"].values()) / len(row["accuracy"]))
        assert row["block_flops"] == demo.block_flops(name, settings)
        assert row["model_flops"] == pytest.approx(demo.model_flops(name, settings, moe["tasks"]))
        assert row["train_seconds"] > 0
    dense, shared, task = rows["dense"], rows["shared MoE"], rows["TaskMoE"]
    # the claim in miniature: far fewer FLOPs per token at similar accuracy
    assert task["block_flops"] < shared["block_flops"] < dense["block_flops"] / 3
    assert task["model_flops"] < shared["model_flops"] < dense["model_flops"] / 3
    for row in (shared, task):
        assert row["mean"] > dense["mean"] - 0.05, (row["name"], row["mean"], dense["mean"])
    # TaskMoE's tokens of a task reach only that task's experts
    assert dense["experts_per_task"] is None
    assert 1 <= task["experts_per_task"] <= settings.experts_per_task < shared["experts_per_task"] <= 8
    # the three models have about the same size (the dense block is as wide as all experts together)
    assert max(r["parameters"] for r in rows.values()) < 1.1 * min(r["parameters"] for r in rows.values())


def test_flops_from_the_shapes():
    s = demo.MoESettings(hidden=16, num_experts=4, expert_ffn=8, top_k=2, experts_per_task=3)
    assert s.dense_ffn == 32
    assert demo.block_flops("dense", s) == 2 * 3 * 16 * 32
    assert demo.block_flops("shared MoE", s) == 2 * 16 * 4 + 2 * (2 * 3 * 16 * 8)
    assert demo.block_flops("TaskMoE", s) == 2 * 16 * 3 + 2 * (2 * 3 * 16 * 8)
    heads = (2 * 16 * 10 + 2 * 16 * 2) / 2
    assert demo.model_flops("dense", s, ["digits", "parity"]) == 2 * 64 * 16 + 2 * 3 * 16 * 32 + heads
    with pytest.raises(ValueError, match="model must be one of"):
        demo.block_flops("sparse", s)
    with pytest.raises(ValueError, match="unknown models"):
        demo.run_moe_experiment(models=["sparse"])


class _OpCounter(TorchDispatchMode):
    """Counts the mtmerge ops that reach the dispatcher (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("mtmerge::"):
            self.counts[name.removeprefix("mtmerge::")] += 1
        return func(*args, **(kwargs or {}))


def test_moe_only_run_trains_with_the_mtmerge_ops(monkeypatch, tmp_path, capsys):
    from mtmerge.demo import command

    real = command.run_moe_experiment
    one_epoch = dataclasses.replace(demo.QUICK_MOE_SETTINGS, epochs=1)
    monkeypatch.setattr(command, "run_moe_experiment", lambda **kw: real(**kw, settings=one_epoch))
    json_path = tmp_path / "moe.json"
    with _OpCounter() as counter:
        code, out = _run(["--quick", "--experiments", "moe", "--work-dir", str(tmp_path / "unused"),
                          "--json", str(json_path)], capsys)
    assert code == 0
    assert "checkpoints:" not in out and len(_tables(out)) == 1  # no merge experiment
    assert not (tmp_path / "unused").exists()
    _, rows = _parse_table(out)
    assert list(rows) == list(demo.MOE_MODELS)
    result = json.loads(json_path.read_text())
    assert list(result) == ["moe"]
    steps = result["moe"]["steps"]
    assert steps == -(-result["moe"]["train_tokens"] // one_epoch.batch)
    # forward and backward of both MoE models ran on mtmerge's ops: one call per training step and model
    # (plus evaluation), the shared router's gate and the task routers' gate, the auxiliary losses
    c = counter.counts
    assert c["moe_experts"] >= 2 * steps and c["moe_experts_backward"] >= 2 * steps, c
    assert c["moe_topk_gate"] >= steps and c["moe_task_gate"] >= steps, c
    assert c["moe_load_balancing_loss"] >= 2 * steps and c["moe_router_z_loss"] >= 2 * steps, c
