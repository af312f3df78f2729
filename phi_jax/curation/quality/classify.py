"""The quality classifier: a small head on a model's embeddings that predicts the teacher's score.

phi-1 trained a random forest on a code model's embeddings to predict GPT-4's judgement of
educational value, then ran it over 35B tokens instead of asking the teacher about each; FineWeb-Edu
did the same for the web with a regression head. Here:

    train_classifier(["out/annotated"], embedder, head="ridge", output="out/classifier")
    score_stage("out/classifier")          # a stage that adds meta.quality to every record

The prediction (`meta.quality`) is always on the rubric's scale (0-5), whatever the head, so one
`--min-quality` means the same for all of them: `ridge` regresses the score, `forest` is a random
forest regressor (phi-1's choice of model), `logistic` classifies the score and predicts its
expected value. The head's parameters are saved as numpy arrays and evaluated here with numpy
(`predict`), never unpickled; a test holds `predict` equal to scikit-learn's own.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from phi_jax.curation.core.stage import Counts, Stage
from phi_jax.curation.quality.annotate import MAX_SCORE, MIN_SCORE
from phi_jax.data import records
from phi_jax.errors import InputError, MissingFileError, require
from phi_jax import fileio
from phi_jax.fileio import atomic_write_json, staged_directory

HEADS = ("ridge", "logistic", "forest")
CLASSIFIER_JSON, CLASSIFIER_NPZ, REPORT_JSON, REPORT_PNG = (
    "classifier.json", "classifier.npz", "report.json", "report.png")
MIN_ANNOTATIONS = 10


# ------------------------------------------------------------------------------------------ heads

def fit_head(head: str, x: np.ndarray, y: np.ndarray, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Fit a standardising scaler + head with scikit-learn; return its parameters as arrays."""
    require("sklearn", extra="data", purpose="training a quality classifier")
    from sklearn.preprocessing import StandardScaler

    if head not in HEADS:
        raise InputError(f"--head={head!r}; choose one of {', '.join(HEADS)}")
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    params = {"head": np.array(head), "mean": scaler.mean_, "scale": scaler.scale_}
    if head == "ridge":
        from sklearn.linear_model import Ridge

        model = Ridge(alpha=1.0).fit(z, y)
        params.update(coef=model.coef_, intercept=np.asarray(model.intercept_))
    elif head == "logistic":
        from sklearn.linear_model import LogisticRegression

        # classes are whole scores: an expected score from logprobs (a float) goes to the nearest
        model = LogisticRegression(C=1.0, max_iter=2000).fit(z, np.rint(y).astype(int))
        params.update(coef=model.coef_, intercept=model.intercept_, classes=model.classes_.astype(np.float64))
    else:
        from sklearn.ensemble import RandomForestRegressor

        model = RandomForestRegressor(n_estimators=100, min_samples_leaf=2, random_state=seed,
                                      n_jobs=1).fit(z, y)
        params.update(_export_forest(model))
    params["_sklearn"] = model  # for tests that compare with scikit-learn; never saved
    return params


def _export_forest(model) -> dict[str, np.ndarray]:
    """The trees as padded arrays [trees, nodes]: children (-1 at leaves), split feature/threshold,
    leaf value."""
    trees = [e.tree_ for e in model.estimators_]
    width = max(t.node_count for t in trees)
    left = np.full((len(trees), width), -1, np.int64)
    right, feature = left.copy(), np.zeros((len(trees), width), np.int64)
    threshold, value = np.zeros((len(trees), width)), np.zeros((len(trees), width))
    for i, t in enumerate(trees):
        n = t.node_count
        left[i, :n], right[i, :n] = t.children_left, t.children_right
        feature[i, :n], threshold[i, :n] = np.maximum(t.feature, 0), t.threshold
        value[i, :n] = t.value[:, 0, 0]
    return {"left": left, "right": right, "feature": feature, "threshold": threshold, "value": value}


def predict(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Predicted score [N] (clipped to the rubric's range) for embeddings x [N, D]."""
    head = str(params["head"])
    z = (np.asarray(x, np.float64) - params["mean"]) / params["scale"]
    if head == "ridge":
        out = z @ params["coef"] + params["intercept"]
    elif head == "logistic":
        logits = z @ params["coef"].T + params["intercept"]
        if logits.shape[1] == 1:  # two classes: scikit-learn keeps one row of weights
            p = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            probs = np.stack([1.0 - p, p], axis=1)
        else:
            logits = logits - logits.max(axis=1, keepdims=True)
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        out = probs @ params["classes"]
    else:
        out = _forest_predict(params, z.astype(np.float32))  # scikit-learn's trees split float32
    return np.clip(out, MIN_SCORE, MAX_SCORE)


def _forest_predict(params: dict[str, np.ndarray], z: np.ndarray) -> np.ndarray:
    left, right, feature = params["left"], params["right"], params["feature"]
    threshold, value = params["threshold"], params["value"]
    total = np.zeros(len(z))
    rows = np.arange(len(z))
    for t in range(len(left)):
        node = np.zeros(len(z), np.int64)
        while True:
            inner = left[t, node] != -1
            if not inner.any():
                break
            go_left = z[rows, feature[t, node]] <= threshold[t, node]
            step = np.where(go_left, left[t, node], right[t, node])
            node = np.where(inner, step, node)
        total += value[t, node]
    return total / len(left)


# -------------------------------------------------------------------------------------- metrics

def binary_metrics(y: np.ndarray, pred: np.ndarray, threshold: float) -> dict[str, Any]:
    """Precision / recall / F1 of "score >= threshold", the confusion matrix, and the score MAE."""
    truth, guess = y >= threshold, pred >= threshold
    tp, fp = int(np.sum(truth & guess)), int(np.sum(~truth & guess))
    fn, tn = int(np.sum(truth & ~guess)), int(np.sum(~truth & ~guess))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    scores = np.arange(MIN_SCORE, MAX_SCORE + 1)
    rounded = np.clip(np.rint(pred), MIN_SCORE, MAX_SCORE).astype(int)
    whole = np.rint(y)  # expected scores (logprobs scoring) are floats: their nearest whole score
    by_score = [[int(np.sum((whole == s) & (rounded == r))) for r in scores] for s in scores]
    return {"threshold": threshold, "n": int(len(y)), "positives": int(truth.sum()),
            "precision": precision, "recall": recall, "f1": f1,
            "accuracy": (tp + tn) / len(y) if len(y) else 0.0,
            "confusion": {"rows": "teacher: below, at/above threshold", "cols": "predicted: below, above",
                          "matrix": [[tn, fp], [fn, tp]]},
            "score_confusion": {"rows": "teacher score 0..5 (rounded)", "cols": "rounded prediction 0..5",
                                "matrix": by_score},
            "mae": float(np.mean(np.abs(pred - y))) if len(y) else 0.0}


# ------------------------------------------------------------------------------------- training

def scored_annotations(directories: Sequence[str]) -> tuple[list[dict], dict[str, int]]:
    """The scored records of annotation outputs, and counts of the rest by status."""
    kept, skipped = [], {}
    for directory in directories:
        for record in records.iter_output(directory):
            annotation = record["meta"].get("annotation")
            if annotation is None:
                raise InputError(f"--annotations={directory}: record {record['id']!r} has no "
                                 "meta.annotation; pass the output of `phi-jax data annotate`")
            if annotation.get("status") == "scored":
                kept.append(record)
            else:
                key = annotation.get("status") or "unknown"
                skipped[key] = skipped.get(key, 0) + 1
    return kept, skipped


def train_classifier(annotations: Sequence[str], embedder, *, head: str, output: str | Path,
                     embedder_info: dict[str, Any], threshold: float = 3.0, test_fraction: float = 0.2,
                     seed: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """Embed the scored annotations, fit `head` on a train split, report on the held-out split.

    Writes output/{classifier.json, classifier.npz, report.json, report.png, manifest.json}
    (all at once: the directory appears complete or not at all). Returns the report.
    """
    require("sklearn", extra="data", purpose="training a quality classifier")
    if head not in HEADS:
        raise InputError(f"--head={head!r}; choose one of {', '.join(HEADS)}")
    if not 0.0 < test_fraction < 1.0:
        raise InputError(f"--test-fraction={test_fraction}: must be between 0 and 1")
    dirs = [d for d in annotations if d]
    manifests = [_annotation_manifest(d) for d in dirs]
    rubrics = sorted({m["parameters"].get("rubric_sha256", "") for m in manifests})
    if len(rubrics) > 1:
        raise InputError(f"--annotations mixes {len(rubrics)} rubrics; scores from different prompts "
                         "are not comparable: train on one rubric's annotations")
    kept, skipped = scored_annotations(dirs)
    y = np.array([r["meta"]["annotation"]["score"] for r in kept], np.float64)
    if len(kept) < MIN_ANNOTATIONS or len(np.unique(y)) < 2:
        raise InputError(f"{len(kept)} scored annotations with {len(np.unique(y))} distinct score(s) in "
                         f"{', '.join(dirs)} (unscored: {skipped or 'none'}); a classifier needs at least "
                         f"{MIN_ANNOTATIONS} and more than one score: annotate more documents")
    train, test = _split(y, threshold, test_fraction, seed)
    start = time.perf_counter()
    x = embedder([r["text"] for r in kept])
    embed_seconds = time.perf_counter() - start
    params = fit_head(head, x[train], y[train], seed=seed)
    pred = predict(params, x[test])
    majority = float(np.mean(y[train] >= threshold) >= 0.5) * MAX_SCORE
    report = {
        "head": head, "threshold": threshold, "train": int(len(train)), "test": int(len(test)),
        "unscored": skipped, "held_out": binary_metrics(y[test], pred, threshold),
        "train_fit": binary_metrics(y[train], predict(params, x[train]), threshold),
        "baseline_majority": binary_metrics(y[test], np.full(len(test), majority), threshold),
        "score_histogram": {str(s): int(np.sum(np.rint(y) == s)) for s in range(MIN_SCORE, MAX_SCORE + 1)},
        "embedding": {"documents": len(kept), "tokens": embedder.tokens, "seconds": round(embed_seconds, 3),
                      "tokens_per_s": embedder.tokens / embed_seconds if embed_seconds > 0 else None},
        "teacher": manifests[0]["parameters"].get("teacher"),
        "rubric": manifests[0]["parameters"].get("rubric"),
    }
    meta = {"head": head, "threshold": threshold, "dim": int(x.shape[1]), "embedder": embedder_info,
            "rubric": report["rubric"], "rubric_sha256": rubrics[0], "teacher": report["teacher"],
            "score_range": [MIN_SCORE, MAX_SCORE], "seed": seed}
    parameters = {"head": head, "threshold": threshold, "test_fraction": test_fraction, "seed": seed,
                  "embedder": embedder_info}
    manifest = records.new_manifest("train-classifier", parameters, _fingerprints(dirs, manifests))
    manifest.update(status="complete", outputs=[{"path": p} for p in (CLASSIFIER_JSON, CLASSIFIER_NPZ,
                                                                      REPORT_JSON, REPORT_PNG)],
                    counts={"records_in": len(kept) + sum(skipped.values()), "records_out": 0,
                            "dropped": {f"annotation_{k}": v for k, v in skipped.items()},
                            "stage": {"train": int(len(train)), "test": int(len(test))}},
                    wall_seconds=round(time.perf_counter() - start, 3), updated=records.now())
    with staged_directory(output, overwrite=overwrite) as tmp:
        np.savez(tmp / CLASSIFIER_NPZ, **{k: v for k, v in params.items() if not k.startswith("_")})
        atomic_write_json(tmp / CLASSIFIER_JSON, meta)
        atomic_write_json(tmp / REPORT_JSON, report)
        plot_report(report, y[test], pred, tmp / REPORT_PNG)
        manifest["versions"] = records.versions()
        records.write_manifest(tmp, manifest)
    return report


def _annotation_manifest(directory: str) -> dict:
    manifest = records.read_manifest(directory)
    if manifest is None or manifest.get("stage") != "annotate":
        raise InputError(f"--annotations={directory}: not the output of `phi-jax data annotate` "
                         f"(no {records.MANIFEST} of an annotate run)")
    if manifest.get("status") != "complete":
        raise InputError(f"--annotations={directory}: the annotate run has not finished; rerun its "
                         "command to complete it")
    return manifest


def _fingerprints(dirs: Sequence[str], manifests: Sequence[dict]) -> list[dict]:
    return [{"path": str(Path(d) / o["path"]), "sha256": o["sha256"], "bytes": o.get("bytes")}
            for d, m in zip(dirs, manifests) for o in m["outputs"]]


def _split(y: np.ndarray, threshold: float, test_fraction: float, seed: int):
    """Train / test indices, stratified on "score >= threshold" when both sides have 2+ examples."""
    from sklearn.model_selection import train_test_split

    labels = y >= threshold
    stratify = labels if min(labels.sum(), (~labels).sum()) >= 2 else None
    index = np.arange(len(y))
    train, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(test)


def plot_report(report: dict, y: np.ndarray, pred: np.ndarray, path: Path) -> None:
    """Predicted against teacher score (held out), and the confusion matrix at the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    held = report["held_out"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    jitter = np.random.default_rng(0).uniform(-0.15, 0.15, len(y))
    a.scatter(y + jitter, pred, s=10, alpha=0.6)
    a.axhline(report["threshold"], color="tab:red", lw=1, ls="--", label=f"threshold {report['threshold']:g}")
    a.plot([MIN_SCORE, MAX_SCORE], [MIN_SCORE, MAX_SCORE], color="grey", lw=0.8)
    a.set_xlabel("teacher score")
    a.set_ylabel(f"predicted ({report['head']})")
    a.set_title(f"held out: n={held['n']}, MAE {held['mae']:.2f}")
    a.legend(loc="upper left", fontsize=8)
    matrix = np.array(held["confusion"]["matrix"])
    b.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        b.text(j, i, str(v), ha="center", va="center")
    b.set_xticks([0, 1], ["pred <", "pred >="])
    b.set_yticks([0, 1], ["teacher <", "teacher >="])
    b.set_title(f"P {held['precision']:.2f}  R {held['recall']:.2f}  F1 {held['f1']:.2f}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- scoring

@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    directory: str
    embedder: str          # model path (the one the classifier was trained with, unless overridden)
    dtype: str
    tokenizer: str | None
    max_tokens: int
    add_bos: bool
    batch_size: int


def load_classifier(directory: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(classifier.json, parameters) of a train-classifier output."""
    directory = fileio.as_path(directory)
    meta_path, npz_path = directory / CLASSIFIER_JSON, directory / CLASSIFIER_NPZ
    if not meta_path.is_file() or not npz_path.is_file():
        raise MissingFileError(f"--classifier={directory}: no {CLASSIFIER_JSON} and {CLASSIFIER_NPZ}; pass the "
                               "output directory of `phi-jax data train-classifier`")
    meta = json.loads(meta_path.read_text())
    with np.load(fileio.local_copy(npz_path), allow_pickle=False) as data:
        params = {k: data[k] for k in data.files}
    return meta, params


def score_stage(classifier: str | Path, *, embedder: str | None = None, batch_size: int = 16) -> Stage:
    """The stage that adds `meta.quality` (the classifier's predicted score) to every record."""
    meta, _ = load_classifier(classifier)
    info = meta["embedder"]
    spec = ClassifierSpec(str(Path(classifier).resolve()), embedder or info["path"], info["dtype"],
                          info.get("tokenizer"), info["max_tokens"], info.get("add_bos", False), batch_size)
    digest = records.file_sha256(Path(classifier) / CLASSIFIER_NPZ)
    parameters = {"classifier": spec.directory, "classifier_sha256": digest, "embedder": spec.embedder,
                  "head": meta["head"], "rubric": meta.get("rubric"), "max_tokens": spec.max_tokens}
    return Stage("score", functools.partial(_ScoreStep, spec), parameters,
                 {"embed_batch_size": batch_size}, batch_size=max(64, batch_size))


class _ScoreStep:
    def __init__(self, spec: ClassifierSpec):
        from phi_jax.inference import loader
        from phi_jax.inference.embed import Embedder

        _, self._params = load_classifier(spec.directory)
        loaded = loader.load(spec.embedder, dtype=spec.dtype, tokenizer=spec.tokenizer)
        loader.require_tokenizer(loaded, spec.embedder)
        self._embed = Embedder(loaded.model, loaded.variables, loaded.tokenizer, max_tokens=spec.max_tokens,
                               batch_size=spec.batch_size, add_bos=spec.add_bos)
        if self._embed.dim != self._params["mean"].shape[0]:
            raise InputError(f"--embedder={spec.embedder} gives {self._embed.dim}-dim embeddings but the "
                             f"classifier was trained on {self._params['mean'].shape[0]}; score with the "
                             "model the classifier was trained with")

    def __call__(self, batch: list[dict], counts: Counts) -> list[dict]:
        tokens = self._embed.tokens
        quality = predict(self._params, self._embed([r["text"] for r in batch]))
        for record, q in zip(batch, quality):
            record["meta"]["quality"] = round(float(q), 4)
        counts.add("scored", len(batch))
        counts.add("embedded_tokens", self._embed.tokens - tokens)
        return batch
