"""Synthesis: a teacher writes textbook sections or executed exercises from a steered plan
(`phi-jax data synthesize`).

    plan.py          `make_plan(kind, count, seed, topics=load_topics(...), steering=...,
                     template=...)`: topics x audiences x styles, a pure function of its inputs
                     (what to ask for, before anything is asked)
    run.py           `run_synthesis(plan, TeacherConfig(...), output)`: generate -> gate -> report;
                     `synthesize_stage`, `summary`
    exercises.py     `parse_exercise`, `run_exercise`: cut the teacher's code into prompt, solution
                     and check, and keep what passes its check in the sandbox
    output_gates.py  `decide`, `gate_stage`, `GateConfig`: the gates on the generated set
                     (duplicates, contamination, repeated openings, low distinct-2)
    diversity.py     `diversity_report`, `plot_report`: coverage against the plan, distinct-n,
                     openings, embedding spread of what was kept
"""
