"""Quality: score documents with a teacher, learn the teacher's score, keep what passes.

    annotate.py    `annotate_stage(load_rubric("edu"), TeacherConfig(...))`: the teacher's score of
                   each record against a rubric, in `meta.annotation` (`phi-jax data annotate`)
    classify.py    `train_classifier(...)`, `score_stage(classifier_dir)`: a head on a model's
                   embeddings that predicts that score, in `meta.quality` (`data train-classifier`,
                   `data score`)
    filter.py      `filter_stage(min_quality=3.0)`: keep records at or above a threshold, count the
                   rest by reason (`data filter`)
"""
