"""The jobs as functions (phi_jax.jobs): config + overrides as the CLI reads them, in-memory chat
data, and the one pipeline orchestrator's resume rules. The jobs themselves run end to end in
test_recipe (main job, recipe), test_finetune and test_run_paths (gs://), and examples/."""

from __future__ import annotations

import json

import pytest

from phi_jax import jobs
from phi_jax.errors import ConfigError, InputError
from phi_jax.jobs.pipeline import StageSkipped, Step, run_pipeline

from train_helpers import ROOT

TINY = f"{ROOT / 'configs/tiny.py'}:runlocal"


def test_overrides_fail_like_the_command_line_and_write_nothing(tmp_path):
    from phi_jax.cli import main as cli_main

    workdir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"train\.stepz does not exist; did you mean --config\.train\.steps"):
        jobs.train(TINY, workdir=str(workdir), overrides={"train.stepz": 2})
    with pytest.raises(ConfigError, match=r"--config\.train\.steps=many: expected an integer"):
        jobs.train(TINY, workdir=str(workdir), overrides={"train.steps": "many"})
    with pytest.raises(ConfigError, match=r"--config\.train\.batch_size=0 is invalid"):
        jobs.train(TINY, workdir=str(workdir), overrides={"train.batch_size": 0})
    assert cli_main(["train", f"--config={TINY}", f"--workdir={workdir}", "--config.train.stepz=2"]) == 2
    assert not workdir.exists()


def test_a_configdict_is_copied_and_overrides_take_python_values():
    from phi_jax.jobs.config import resolve
    from phi_jax.training.config_file import load_config

    original = load_config(TINY)
    config = resolve(original, {"train.steps": 3, "optimizer.lr": 1e-4, "curation.enabled": False,
                                "curation.sources": "default,jsonl"})
    assert (config.train.steps, config.optimizer.lr, config.curation.enabled) == (3, 1e-4, False)
    assert original.train.steps == 6 and original.curation.enabled  # the caller's object is unchanged
    with pytest.raises(ConfigError, match="ml_collections.ConfigDict"):
        resolve(42)


def test_finetune_names_a_bad_in_memory_conversation(tmp_path):
    config = f"{ROOT / 'configs/finetune_smollm2_lora.py'}:runlocal"
    for data, problem in (([{"msgs": []}], "data[0] is not a conversation"),
                          ([], "data is an empty list"),
                          ([{"messages": [{"role": "user", "content": "hi"}]}, "text"], "data[1]")):
        with pytest.raises(InputError, match=problem.replace("[", r"\[").replace("]", r"\]")):
            jobs.finetune(config, model="smollm2", data=data, workdir=str(tmp_path / "ft"))
    assert not (tmp_path / "ft").exists()


def test_in_memory_conversations_become_chat_records(tmp_path):
    from phi_jax.data import records
    from phi_jax.data.chat_examples import conversation_of
    from phi_jax.jobs.finetuning import data_files, write_conversations

    chats = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
             for i in range(3)]
    directory = write_conversations(tmp_path / "data", chats)
    source, files = data_files(directory)
    got = [conversation_of(r, "messages") for shard in records.plan_shards(files) for r in shard.read()]
    assert source == "jsonl" and got == [c["messages"] for c in chats]


def test_the_pipeline_skips_done_stages_reruns_deleted_ones_and_refuses_other_settings(tmp_path):
    ran = []

    def stage(name, value, *, skip=False):
        def run():
            ran.append(name)
            if skip:
                raise StageSkipped("nothing to do here")
            (tmp_path / name).mkdir(exist_ok=True)
            return {"value": value}
        return Step(name, run=run, output=tmp_path / name, settings={"lr": 1})

    steps = lambda: [stage("a", 1), stage("b", 2, skip=True), stage("c", 3), Step("d", off="switched off")]
    first = run_pipeline(steps(), tmp_path / "stages")
    assert ran == ["a", "b", "c"]
    assert [first[s]["status"] for s in "abcd"] == ["done", "skipped", "done", "off"]
    assert first["b"]["reason"] == "nothing to do here" and first["c"]["result"] == {"value": 3}
    marker = json.loads((tmp_path / "stages" / "a.json").read_text())
    assert marker["status"] == "done" and marker["settings"] == {"lr": 1}

    ran.clear()
    (tmp_path / "c").rmdir()  # a stage whose output is gone is redone
    again = run_pipeline(steps(), tmp_path / "stages")
    assert ran == ["b", "c"]  # a skipped stage is asked again; a done one is not
    assert again["a"]["rerun"] == "skipped (already done)" and again["a"]["result"] == {"value": 1}

    other = [Step("a", run=lambda: {}, output=tmp_path / "a", settings={"lr": 2})]
    with pytest.raises(InputError, match=r"other settings or inputs \(lr: 1 -> 2\)"):
        run_pipeline(other, tmp_path / "stages")
