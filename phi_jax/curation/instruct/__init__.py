"""Orca-2 instruction data: a teacher answers under a strategy's system prompt; the student's copy
keeps a generic one (prompt erasure) (`phi-jax data instruct`, `phi-jax data tasks`).

    run.py           `run_instruct(tasks, output, teacher=TeacherConfig(...), select="dev")`:
                     strategy selection, `instruct_stage`, `selection_table`
    strategies.py    `load_strategies`, `load_strategy_map`, `LeakCheck`: the system prompts (package
                     data in `phi_jax/curation/prompts/strategies/`), which task type gets which, and
                     the check that keeps their text out of the training data
    corpus_tasks.py  `generate_tasks(count, seed)`, `write_tasks`: tasks with checkable answers built
                     from the embedded corpus (stdlib + pydoc topics), the input of `run_instruct`
"""
