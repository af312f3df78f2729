"""Orca-2 strategies: the system prompts a teacher answers under, which task type gets which, and
the leak check that keeps their text out of the training data.

A strategy is a text file: a `name:` and a `description:` line, a `---` line, then the detailed
system prompt the teacher sees (the student never does: see `phi_jax.data.tasks`):

    name: step_by_step
    description: Work the problem out in small numbered steps ...
    ---
    You solve problems by reasoning in the open. ...

The built-in five (step_by_step, recall_then_generate, recall_reason_generate, extract_generate,
direct_answer) are package data in `prompts/strategies/`; `load_strategies(["mine/"])` adds the
`*.txt` files of a directory (or single files), and one named like a built-in replaces it.

A strategy map is JSON, `{"default": name, "types": {task type: name}}`: the built-in one
(`prompts/strategies/default_map.json`) covers the task types of `phi-jax data tasks`.

The leak check (`LeakCheck`): teachers sometimes quote their instructions ("As a step-by-step
solver, I will ..."), which would put the erased strategy prompt back into the data. An answer
that shares any run of `LEAK_WORDS` (13) words with any strategy prompt (words as curation counts
them everywhere: `core.text.words`) is dropped. The prompts' 13-grams are kept as a set of 64-bit
hashes, so a check costs one hash per word of the answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from phi_jax.curation.core.text import words
from phi_jax.errors import InputError, MissingFileError

BUILTIN_STRATEGIES = ("step_by_step", "recall_then_generate", "recall_reason_generate",
                      "extract_generate", "direct_answer")
DEFAULT_MAP = "default"
LEAK_WORDS = 13
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclasses.dataclass(frozen=True)
class Strategy:
    """name, a one-line description (for people), the system prompt (for the teacher), its file."""

    name: str
    description: str
    prompt: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()


def parse_strategy(text: str, source: str) -> Strategy:
    """A strategy file's text -> Strategy, or a one-line error naming the file and the fix."""
    head, sep, prompt = text.partition("\n---\n")
    fix = "; a strategy file is 'name: NAME', 'description: ...', a '---' line, then the system prompt"
    if not sep:
        raise InputError(f"{source}: no '---' line between the header and the prompt{fix}")
    fields = {}
    for line in head.strip().splitlines():
        key, colon, value = line.partition(":")
        if not colon or key.strip() not in ("name", "description"):
            raise InputError(f"{source}: header line {line!r} is not 'name: ...' or 'description: ...'{fix}")
        fields[key.strip()] = value.strip()
    name, description, prompt = fields.get("name", ""), fields.get("description", ""), prompt.strip()
    if not _NAME.match(name):
        raise InputError(f"{source}: name {name!r} must be lower-case letters, digits, _ or -{fix}")
    if not description:
        raise InputError(f"{source}: the description is empty{fix}")
    if len(words(prompt)) < LEAK_WORDS:
        raise InputError(f"{source}: the system prompt has fewer than {LEAK_WORDS} words; write the "
                         "instructions out (the leak check looks for 13-word runs of it)")
    return Strategy(name, description, prompt, source)


def load_strategies(extra: str | Sequence[str] = ()) -> dict[str, Strategy]:
    """The built-in strategies, then those of `extra` (files or directories of *.txt), by name."""
    root = importlib.resources.files("phi_jax.curation") / "prompts" / "strategies"
    found = {name: parse_strategy((root / f"{name}.txt").read_text("utf-8"), f"builtin:{name}")
             for name in BUILTIN_STRATEGIES}
    specs = [s.strip() for s in extra.split(",")] if isinstance(extra, str) else list(extra)
    for spec in filter(None, specs):
        path = Path(spec)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise InputError(f"--strategies={spec}: the directory has no *.txt strategy files")
        elif path.is_file():
            files = [path]
        else:
            raise MissingFileError(f"--strategies={spec}: no such file or directory")
        for file in files:
            try:
                strategy = parse_strategy(file.read_text("utf-8"), str(file))
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"{file}: cannot read it as UTF-8 text ({e})") from None
            found[strategy.name] = strategy
    return found


@dataclasses.dataclass(frozen=True)
class StrategyMap:
    """Task type -> strategy name, with a default for types it does not list."""

    default: str
    types: Mapping[str, str]
    source: str

    def strategy_of(self, task_type: str) -> str:
        return self.types.get(task_type, self.default)

    def as_json(self) -> dict:
        return {"default": self.default, "types": dict(sorted(self.types.items())), "source": self.source}


def load_strategy_map(spec: str, strategies: Mapping[str, Strategy]) -> StrategyMap:
    """"default" (the built-in map) or a JSON file; every name must be a loaded strategy."""
    if spec == DEFAULT_MAP:
        text = (importlib.resources.files("phi_jax.curation") / "prompts" / "strategies"
                / "default_map.json").read_text("utf-8")
        source = "builtin:default_map.json"
    else:
        try:
            text = Path(spec).read_text("utf-8")
        except OSError as e:
            raise MissingFileError(f"--strategy-map={spec}: cannot read it ({e.strerror})") from None
        source = spec
    fix = '; write {"default": "step_by_step", "types": {"my_type": "direct_answer", ...}}'
    try:
        data = json.loads(text)
    except ValueError as e:
        raise InputError(f"--strategy-map={spec}: not valid JSON ({e}){fix}") from None
    if not isinstance(data, dict) or not isinstance(data.get("default"), str) \
            or not isinstance(data.get("types", {}), dict):
        raise InputError(f"--strategy-map={spec}: needs a 'default' strategy name and a 'types' object{fix}")
    types = data.get("types", {})
    for task_type, name in [("(default)", data["default"]), *types.items()]:
        if name not in strategies:
            raise InputError(f"--strategy-map={spec}: {task_type} -> {name!r} is not a strategy; known: "
                             f"{', '.join(strategies)} (add yours with --strategies=FILE_OR_DIR)")
    return StrategyMap(data["default"], dict(types), source)


def _ngram_hashes(tokens: Sequence[str], n: int) -> Iterable[int]:
    for i in range(len(tokens) - n + 1):
        digest = hashlib.blake2b(" ".join(tokens[i:i + n]).encode("utf-8"), digest_size=8).digest()
        yield int.from_bytes(digest, "big")


class LeakCheck:
    """Does a text quote any strategy prompt (a run of `n` words, normalised)?"""

    def __init__(self, prompts: Iterable[str], n: int = LEAK_WORDS):
        self.n = n
        self._hashes = {h for prompt in prompts for h in _ngram_hashes(words(prompt), n)}

    def leaks(self, text: str) -> bool:
        return any(h in self._hashes for h in _ngram_hashes(words(text), self.n))
