"""Benchmark decontamination: cut evaluation text out of training data (`phi-jax data decontaminate`).

    remove.py           `decontaminate(records, against=["humaneval"])` (in memory),
                        `decontaminate_stage(against)`: word 13-gram cuts (GPT-3 / lm-eval's janitor)
                        plus phi-1's code checks; `Decontaminator`, `DecontamConfig`
    eval_sets.py        `load_eval_sets("humaneval,evals/mmlu.jsonl:question+answer")`: the
                        evaluation sets to check against (built-ins and JSONL files)
    code_similarity.py  phi-1's code checks: `function_units`, AST token edit distance (`AstIndex`)
                        and embedding distance (`EmbeddingIndex`) to benchmark solutions
"""
