"""Seeds for synthesis: topics crossed with audiences and styles, planned as a pure function.

    plan = make_plan("textbook", count=1000, seed=0, topics=load_topics("default"),
                     steering=load_steering("textbook"), template=load_template("textbook"))
    plan.items()          # [PlanItem(index, id, topic, audience, style)], the same for the same inputs
    run_stage(stage, plan, out)   # a `PlannedInputs`: the runner shards the prompts like files

The hard problem of synthetic data is diversity (Cosmopedia), so the plan steers it instead of
hoping for it: topics come from a topic source (the embedded corpus: stdlib modules, their public
functions and the language reference's headings; or a user file), and each is crossed with an
audience and a style from a steering file. The mix is *scheduled*, not sampled: every prefix of
the plan is within one item of the target share of each topic kind, each audience and each style
(and within about one and a half of each audience x style cell), and topics are drawn from a
seeded permutation of their kind (each used once before any repeats). The plan is prefix-stable:
a larger --count keeps the first items, so their cached answers are reused. Prompt ids are
`<kind>-s<seed>-<index>`, a function of the seed and the index only, so a killed run resumes and a
rerun reproduces the same prompts.

Files users can override: the prompt template (`prompts/textbook.txt`, `prompts/exercise.txt`;
placeholders `{topic}`, `{audience}`, `{style}`) and the steering file (`prompts/steering.yaml`:
per kind, audience and style names mapped to the instruction that fills the placeholder).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any, Sequence

from phi_jax.curation.core import templates
from phi_jax.curation.core.templates import PromptTemplate, template_sha256
from phi_jax.errors import InputError

KINDS = ("textbook", "exercises")
PLACEHOLDERS = ("{topic}", "{audience}", "{style}")
DEFAULT_TOPIC_MIX = (("module", 1.0), ("function", 1.0), ("language", 1.0))
_TEMPLATE_FILE = {"textbook": "textbook.txt", "exercises": "exercise.txt"}
_HINT_CHARS = 160


# ---------------------------------------------------------------------------------------- topics

@dataclasses.dataclass(frozen=True)
class Topic:
    """One seed topic. `text` fills {topic}; `kind` and `name` are what coverage is counted by."""

    text: str
    kind: str
    name: str


@functools.lru_cache(maxsize=1)
def default_topics() -> tuple[Topic, ...]:
    """Topics from the embedded corpus, in corpus order (about 2,500 on Python 3.11).

    module: a public stdlib module with a docstring; function: a public top-level function with a
    docstring; language: a `pydoc_data.topics` heading. The docstring's first line (or heading)
    goes into the topic text as a hint of what the thing is.
    """
    from phi_jax.data import corpus

    root, modules, functions, language, headings = corpus.stdlib_dir(), [], [], [], set()
    for name in corpus.document_names():
        if name.startswith("pydoc_data.topics:"):
            heading = next((ln.strip() for ln in corpus.read_document(name).splitlines() if ln.strip()), "")
            if heading and heading not in headings:
                headings.add(heading)
                language.append(Topic(f"{heading} (from the Python language reference)", "language",
                                      name.split(":", 1)[1]))
            continue
        parts = name[:-3].split("/")
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if not parts or any(p.startswith("_") for p in parts) or parts[-1] == "__main__":
            continue
        module = ".".join(parts)
        try:
            tree = ast.parse(corpus.read_document(name, root))
        except (SyntaxError, ValueError):
            continue
        doc = _first_line(ast.get_docstring(tree))
        if doc:
            modules.append(Topic(f"the `{module}` module of Python's standard library ({doc})",
                                 "module", module))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                hint = _first_line(ast.get_docstring(node))
                if hint:
                    functions.append(Topic(f"the function `{module}.{node.name}` of Python's standard "
                                           f"library ({hint})", "function", f"{module}.{node.name}"))
    return tuple(modules + functions + language)


def _first_line(doc: str | None) -> str:
    line = " ".join((doc or "").strip().split("\n\n")[0].split())
    return line if len(line) <= _HINT_CHARS else line[:_HINT_CHARS].rsplit(" ", 1)[0] + " ..."


def load_topics(spec: str) -> tuple[Topic, ...]:
    """"default" (the embedded corpus) or a file: JSONL, YAML or plain text (one topic a line).

    A JSONL line / YAML list item is a string or {"topic": str, "kind": str?, "name": str?}; a YAML
    file may also be {"topics": [...]}. Kind defaults to "user", name to the topic itself.
    """
    if spec == "default":
        return default_topics()
    text = templates.read_text_file(spec, "--topics", hint="pass 'default' or a .jsonl, .yaml or .txt file")
    suffix = Path(spec).suffix.lower()
    if suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"{spec}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise InputError(f"{spec}:{n}: not valid JSON ({e.msg}); write one topic per line as "
                                     '"a string" or {"topic": "...", "kind": "..."}') from None
    elif suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise InputError(f"--topics={spec}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
        if isinstance(data, dict) and "topics" in data:
            data = data["topics"]
        if not isinstance(data, list):
            raise InputError(f"--topics={spec}: expected a YAML list of topics (or topics: [...]), got "
                             f"{type(data).__name__}")
        items = [(f"{spec} item {n}", x) for n, x in enumerate(data, 1)]
    else:
        items = [(f"{spec}:{n}", line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    topics = tuple(_topic(where, x) for where, x in items)
    if not topics:
        raise InputError(f"--topics={spec}: the file holds no topic; write one topic per line")
    return topics


def _topic(where: str, item: Any) -> Topic:
    if isinstance(item, str) and item.strip():
        return Topic(item.strip(), "user", item.strip())
    if isinstance(item, dict) and isinstance(item.get("topic"), str) and item["topic"].strip():
        kind, name = item.get("kind", "user"), item.get("name", item["topic"].strip())
        if not isinstance(kind, str) or not kind or not isinstance(name, str):
            raise InputError(f"{where}: 'kind' and 'name' must be non-empty strings")
        return Topic(item["topic"].strip(), kind, name)
    raise InputError(f"{where}: a topic must be a non-empty string or an object with a 'topic' string, "
                     f"got {json.dumps(item)[:80]}")


# -------------------------------------------------------------------------- steering, templates

@dataclasses.dataclass(frozen=True)
class Steering:
    """Audience and style names -> the instruction that fills {audience} / {style}."""

    name: str
    sha256: str
    audiences: tuple[tuple[str, str], ...]
    styles: tuple[tuple[str, str], ...]


def load_steering(kind: str, path: str | None = None) -> Steering:
    """The built-in steering file's section for `kind`, or a user YAML file of the same shape."""
    import yaml

    check_kind(kind)
    if path is None:
        text = templates.builtin_text("steering.yaml")
    else:
        text = templates.read_text_file(path, "--steering")
    where = "prompts/steering.yaml" if path is None else f"--steering={path}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"{where}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    if isinstance(data, dict) and kind in data:
        data = data[kind]
    if not (isinstance(data, dict) and isinstance(data.get("audiences"), dict)
            and isinstance(data.get("styles"), dict)):
        raise InputError(f"{where}: expected '{kind}: {{audiences: {{name: instruction}}, styles: "
                         "{name: instruction}}' (or audiences/styles at the top level)")
    out = {}
    for axis in ("audiences", "styles"):
        pairs = []
        for name, instruction in data[axis].items():
            if not isinstance(instruction, str) or not instruction.strip():
                raise InputError(f"{where}: {axis}.{name} must be a non-empty instruction string")
            pairs.append((str(name), " ".join(instruction.split())))
        if not pairs:
            raise InputError(f"{where}: {axis} is empty; name at least one")
        out[axis] = tuple(pairs)
    return Steering(path or "builtin", template_sha256(json.dumps(out, sort_keys=True)), **out)


def load_template(kind: str, path: str | None = None) -> PromptTemplate:
    """The built-in template of `kind`, or the user's file (which must hold all three placeholders)."""
    check_kind(kind)
    return templates.load_template(path or kind, builtin={} if path else {kind: _TEMPLATE_FILE[kind]},
                                   flag="--template", placeholders=PLACEHOLDERS)


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise InputError(f"--kind={kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def parse_mix(spec: str | None, available: Sequence[str], flag: str) -> tuple[tuple[str, float], ...]:
    """"a:2,b" -> (("a", 2.0), ("b", 1.0)); None or "" -> every available name with weight 1."""
    if not spec:
        return tuple((name, 1.0) for name in available)
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        if name not in available:
            raise InputError(f"{flag}: unknown name {name!r}; choose from {', '.join(available)}")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = -1.0
        if not (math.isfinite(value) and value > 0):
            raise InputError(f"{flag}: weight {weight!r} of {name} must be a positive number")
        out[name] = value
    if not out:
        raise InputError(f"{flag} is empty; name at least one of {', '.join(available)}")
    return tuple(out.items())


# ------------------------------------------------------------------------------------------ plan

@dataclasses.dataclass(frozen=True)
class PlanItem:
    index: int
    id: str
    topic: Topic
    audience: str
    style: str


def _schedule(weights: Sequence[tuple[Any, float]], count: int, rng: random.Random) -> list[Any]:
    """Smooth weighted round-robin: every prefix is within one pick per name of its target share.

    Names are tried in a seeded order, so ties (equal weights) fall differently for each seed.
    """
    names = [n for n, _ in weights]
    order = rng.sample(range(len(names)), len(names))
    w = [weights[i][1] for i in order]
    total, current, out = sum(w), [0.0] * len(order), []
    for _ in range(count):
        for i, wi in enumerate(w):
            current[i] += wi
        best = max(range(len(w)), key=lambda i: current[i])
        current[best] -= total
        out.append(names[order[best]])
    return out


def _cross_schedule(rows: Sequence[tuple[str, float]], cols: Sequence[tuple[str, float]], count: int,
                    rng: random.Random) -> list[tuple[str, str]]:
    """(row, col) pairs whose row shares, col shares and cell shares all track their targets.

    Greedy on deficits: each pick is the cell whose row, column and cell are furthest behind their
    target counts (summed). Every prefix stays within one pick of each row's and each column's
    target, and within about one and a half of each cell's; ties fall in a seeded order.
    """
    row_share = {r: w / sum(w for _, w in rows) for r, w in rows}
    col_share = {c: w / sum(w for _, w in cols) for c, w in cols}
    cells = [(r, c) for r, _ in rows for c, _ in cols]
    cells = [cells[i] for i in rng.sample(range(len(cells)), len(cells))]
    got_row, got_col = dict.fromkeys(row_share, 0), dict.fromkeys(col_share, 0)
    got_cell = dict.fromkeys(cells, 0)

    def behind(rc: tuple[str, str], n: int) -> float:
        r, c = rc
        return ((row_share[r] * n - got_row[r]) + (col_share[c] * n - got_col[c])
                + (row_share[r] * col_share[c] * n - got_cell[rc]))

    out = []
    for n in range(1, count + 1):
        best = max(cells, key=lambda rc: behind(rc, n))
        got_row[best[0]] += 1
        got_col[best[1]] += 1
        got_cell[best] += 1
        out.append(best)
    return out


@dataclasses.dataclass(frozen=True)
class Plan:
    """The prompts of one synthesis run: a pure function of its fields (see the module docstring)."""

    kind: str
    count: int
    seed: int
    topics: tuple[Topic, ...]
    topic_source: str
    topic_mix: tuple[tuple[str, float], ...]
    audiences: tuple[tuple[str, float], ...]
    styles: tuple[tuple[str, float], ...]
    steering: Steering
    template: PromptTemplate

    @functools.cached_property
    def _items(self) -> tuple[PlanItem, ...]:
        by_kind: dict[str, list[Topic]] = {}
        for topic in self.topics:
            by_kind.setdefault(topic.kind, []).append(topic)
        kinds = _schedule(self.topic_mix, self.count, random.Random(f"{self.seed}:topic-kinds"))
        cells = _cross_schedule(self.audiences, self.styles, self.count, random.Random(f"{self.seed}:cells"))
        drawn: dict[str, list[Topic]] = {k: [] for k in by_kind}
        used: dict[str, int] = {k: 0 for k in by_kind}
        items = []
        for index, (kind, (audience, style)) in enumerate(zip(kinds, cells)):
            pool = by_kind[kind]
            if used[kind] == len(drawn[kind]):  # a new epoch: a fresh permutation of this kind's topics
                epoch = used[kind] // len(pool)
                drawn[kind] += random.Random(f"{self.seed}:topics:{kind}:{epoch}").sample(pool, len(pool))
            topic = drawn[kind][used[kind]]
            used[kind] += 1
            items.append(PlanItem(index, f"{self.kind}-s{self.seed}-{index:06d}", topic, audience, style))
        return tuple(items)

    def items(self) -> tuple[PlanItem, ...]:
        return self._items

    def plan_shards(self, shard_size: int) -> list["PlanShard"]:
        items = self.items()
        audiences, styles = dict(self.steering.audiences), dict(self.steering.styles)
        return [PlanShard(n, self.kind, self.seed, items[start:start + shard_size], self.template,
                          tuple((a, audiences[a]) for a, _ in self.audiences),
                          tuple((s, styles[s]) for s, _ in self.styles))
                for n, start in enumerate(range(0, len(items), shard_size))]

    @functools.cached_property
    def sha256(self) -> str:
        """Of every prompt the plan will send (topic, audience, style and the rendered text's parts)."""
        digest = hashlib.sha256()
        digest.update(json.dumps([self.kind, self.template.sha256, self.steering.sha256]).encode())
        for item in self.items():
            digest.update(json.dumps([item.id, item.topic.text, item.topic.kind, item.audience,
                                      item.style]).encode("utf-8"))
        return digest.hexdigest()

    def fingerprints(self) -> list[dict[str, Any]]:
        return [{"path": f"synthesis-plan:{self.topic_source}", "sha256": self.sha256, "prompts": self.count,
                 "topics": len(self.topics)}]

    def parameters(self) -> dict[str, Any]:
        """What the plan depends on, for the manifest."""
        return {"kind": self.kind, "count": self.count, "seed": self.seed, "topics": self.topic_source,
                "topic_mix": dict(self.topic_mix), "audiences": dict(self.audiences),
                "styles": dict(self.styles), "template": Path(self.template.name).name,
                "template_sha256": self.template.sha256, "steering": self.steering.name,
                "steering_sha256": self.steering.sha256}

    def targets(self) -> dict[str, dict[str, float]]:
        """The target share of each topic kind, audience and style."""
        out = {}
        for axis, mix in (("topic_kind", self.topic_mix), ("audience", self.audiences), ("style", self.styles)):
            total = sum(w for _, w in mix)
            out[axis] = {name: w / total for name, w in mix}
        return out


@dataclasses.dataclass(frozen=True)
class PlanShard:
    """Prompts [items] of a plan; `read()` yields one seed record per prompt (picklable)."""

    index: int
    kind: str
    seed: int
    items: tuple[PlanItem, ...]
    template: PromptTemplate
    audiences: tuple[tuple[str, str], ...]
    styles: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    @property
    def size(self) -> int:
        return len(self.items)

    def describe(self) -> str:
        return f"{self.name} (synthesis plan [{self.items[0].index}:{self.items[-1].index + 1}])"

    def read(self):
        from phi_jax.data.records import make_record

        audiences, styles = dict(self.audiences), dict(self.styles)
        for item in self.items:
            prompt = self.template.render(topic=item.topic.text, audience=audiences[item.audience],
                                          style=styles[item.style])
            yield make_record(item.id, prompt, {
                "topic": item.topic.text, "topic_kind": item.topic.kind, "topic_name": item.topic.name,
                "audience": item.audience, "style": item.style, "plan_index": item.index, "seed": self.seed})


def make_plan(kind: str, *, count: int, seed: int, topics: Sequence[Topic], topic_source: str,
              steering: Steering, template: PromptTemplate, topic_mix: str | None = None,
              audiences: str | None = None, styles: str | None = None) -> Plan:
    """A `Plan` from parsed inputs; mixes are "name:weight,..." strings (None: see module docstring)."""
    check_kind(kind)
    if count < 1:
        raise InputError(f"--count={count}: must be >= 1")
    kinds = sorted({t.kind for t in topics})
    if topic_mix is None and topic_source == "default":
        mix = tuple(pair for pair in DEFAULT_TOPIC_MIX if pair[0] in kinds)
    elif topic_mix is None:  # every topic equally likely
        mix = tuple((k, float(sum(t.kind == k for t in topics))) for k in kinds)
    else:
        mix = parse_mix(topic_mix, kinds, "--topic-mix")
    return Plan(kind, count, seed, tuple(topics), topic_source, mix,
                parse_mix(audiences, [a for a, _ in steering.audiences], "--audiences"),
                parse_mix(styles, [s for s, _ in steering.styles], "--styles"), steering, template)
