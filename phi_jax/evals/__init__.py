"""Evaluation: sandboxed HumanEval, perplexity, multiple choice, tasks with references answered as a
chat model (`tasks`: the before/after evaluation of instruction tuning), and an lm-eval-harness adapter.

Submodules are imported on use (`from phi_jax.evals import humaneval`), so importing this package
pulls in neither JAX nor lm-eval.
"""
