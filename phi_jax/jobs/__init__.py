"""The jobs a user runs, as plain functions with results: train, finetune, recipe.

Every `phi-jax train / finetune / recipe` command is one of these functions; the command line
only parses its flags into their arguments and prints the result, so a notebook, a launcher or a
test runs exactly what the command runs (levanter's `train_lm.main(config)`, big_vision's
`train.main`):

    import phi_jax

    # the main job: curate (annotate -> filter -> dedup -> decontaminate), then train
    run = phi_jax.train("configs/tiny.py:runlocal", workdir="runs/tiny",
                        overrides={"train.steps": 20})
    run.final_loss, run.paths["checkpoints"], print(run.table)

    # LoRA fine-tuning on conversations held in memory, then chat with the result
    tuned = phi_jax.finetune("configs/finetune_smollm2_lora.py:runlocal", model="smollm2",
                             data=[{"messages": [{"role": "user", "content": "Say hi."},
                                                 {"role": "assistant", "content": "Hi!"}]}],
                             workdir="runs/ft", overrides={"train.steps": 3})
    tuned.adapter                                   # WORKDIR/adapter, PEFT's format
    tuned.loaded.chat([{"role": "user", "content": "Say hi."}])

    # phi-1's recipe end to end (a local teacher is started unless one is given)
    report = phi_jax.recipe("configs/recipe_phi1_tiny.py:runlocal", workdir="runs/recipe").report

Common to all three:
  * `config` is a config file as the CLI takes it (`"configs/tiny.py"`, `"configs/tiny.py:runlocal"`
    passes `runlocal` to its `get_config`) or an `ml_collections.ConfigDict` (copied, never changed);
  * `overrides` is a `{"train.steps": 2, ...}` dict, parsed as `--config.train.steps=2` is, so an
    unknown key is the same `ConfigError` naming the key (with a "did you mean");
  * `workdir` is local or `gs://...`: every path derived from it goes through `phi_jax.fileio`, so
    a bucket run writes nothing to the working directory and resumes from any machine;
  * calling again with the same workdir resumes: the trainer from its last checkpoint, bit for
    bit, and the stage pipelines (`phi_jax.jobs.pipeline`, the one orchestrator) skip finished
    stages and refuse a workdir made with other settings;
  * errors are `phi_jax.errors.PhiJaxError`s whose message names the problem and the fix.

Modules: main (curate then train), curate (the main job's curation stages), finetuning,
phi1_recipe (+ local_teacher, recipe_report), pipeline (markers, resume, the settings check),
config (file or ConfigDict + overrides).
"""

from phi_jax.jobs.finetuning import FinetuneResult, finetune
from phi_jax.jobs.main import TrainResult, train
from phi_jax.jobs.phi1_recipe import RecipeResult, recipe

__all__ = ["train", "finetune", "recipe", "TrainResult", "FinetuneResult", "RecipeResult"]
