"""Recipes: one YAML file that states an experiment (a base model, variants as chains of transforms, one heal
budget for every variant and the control, the evaluation), validated by pydantic models.

    name: cache-ladder
    base: default                     # the default SmolLM2 GGUF, an HF dir, a .gguf or a hub id
    seed: 0
    device: cpu
    heal: {data: $QKVCONV_DATA_DIR/gutenberg_en/gutenberg_en_train.txt, steps: 100, train: attention}
    eval: {tasks: [lambada_openai], limit: 200}
    variants:
      - name: k=v
        steps:
          - share-kv: {mode: k=v}
      - name: kv-heads-1
        heal: none                    # evaluated as converted
        steps:
          - share-kv: {kv_heads: 1}

A step's options are the command's own (qkvconv.options), so `- share-kv: {kv_heads: 3}` means exactly
`qkvconv share-kv --kv-heads 3`. Errors name the file, the line and the key in one line
(`recipes/x.yaml:12: variants[1].steps[0].share-kv.kv_head: unknown key`); the CLI exits 2 on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import pydantic
from pydantic import Field, field_validator, model_validator

from qkvconv.errors import QkvconvError
from qkvconv.options import (AbsorbQueryOptions, AttachPreprojOptions, AttachQueryMlpOptions, ConvertOptions,
                             EvalOptions, FinetuneOptions, LatentKvOptions, Options, ShareKvOptions, dotted,
                             error_message)


class RecipeError(QkvconvError):
    """A recipe that does not validate: `file:line: key: what`; exit status 2 (a usage error)."""

    exit_code = 2


class Step(Options):
    """One transform of a chain: a mapping with exactly one key, the command's name, holding its options."""

    absorb_query: Optional[AbsorbQueryOptions] = Field(None, alias="absorb-query")
    share_kv: Optional[ShareKvOptions] = Field(None, alias="share-kv")
    latent_kv: Optional[LatentKvOptions] = Field(None, alias="latent-kv")
    attach_query_mlp: Optional[AttachQueryMlpOptions] = Field(None, alias="attach-query-mlp")
    attach_preproj: Optional[AttachPreprojOptions] = Field(None, alias="attach-preproj")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        """`- absorb-query` (no options) and `- absorb-query:` (null) mean the command's defaults."""
        if isinstance(v, str):
            return {v: {}}
        if isinstance(v, dict):
            return {k: ({} if opts is None else opts) for k, opts in v.items()}
        return v

    @model_validator(mode="after")
    def _one(self):
        if len(self.model_fields_set) != 1:
            names = ", ".join(f.alias for f in type(self).model_fields.values())
            raise ValueError(f"a step is one transform ({names}) with its options")
        return self

    @property
    def options(self) -> ConvertOptions:
        return getattr(self, next(iter(self.model_fields_set)))

    @property
    def transform(self) -> str:
        return self.options.transform

    def describe(self) -> dict[str, Any]:
        """{"transform": name, **every option (defaults included)}: results.json's `transforms` entry."""
        return {"transform": self.transform, **self.options.model_dump(mode="json")}


class Variant(Options):
    name: str = Field(min_length=1)
    steps: list[Step] = Field(min_length=1)
    heal: Optional[Literal["none"]] = None  # "none": evaluated as converted, not healed
    train: Optional[Literal["new", "attention", "all"]] = None  # this variant's --train (default: the heal's)

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        if v in ("base", "control"):
            raise ValueError(f"{v!r} is the name of a model every run has; name the variant otherwise")
        return v


class Control(Options):
    """How the control (the unmodified base finetuned with the heal budget) is trained."""

    train: Optional[Literal["attention", "all"]] = None  # default: the heal's --train, attention if that is new


class Recipe(Options):
    name: str = Field(min_length=1, pattern=r"^[\w.=+-]+$")
    description: str = ""
    base: str  # "default": qkvconv's default checkpoint (SmolLM2-135M-Instruct GGUF)
    seed: int = 0  # every conversion's and the heal's seed, unless a step or the heal sets its own
    device: str = "auto"  # auto | cpu | cuda | cuda:N: every step runs there, unless a step sets its own
    variants: list[Variant] = Field(min_length=1)
    heal: Optional[FinetuneOptions] = None  # one budget for every variant and the control; None: nothing healed
    control: Control = Control()
    eval: EvalOptions = EvalOptions()

    @model_validator(mode="after")
    def _unique(self):
        names = [v.name for v in self.variants]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"variant names must be unique: {', '.join(dup)} repeated")
        return self


def chain_problem(steps: list[Step]) -> tuple[int, str] | None:
    """(index of the offending step, why) if the chain cannot run, else None. What qkvconv.convert allows:
    share-kv only on a stock checkpoint (so first), absorb-query once and not on a shared-projection model,
    each attach-* once, absorb-query before the attach-* steps (their modules hang on the query it replaces);
    latent-kv on a stock checkpoint or right after share-kv (the latent over its pooled heads or its shared K=V),
    and last (nothing else reads a latent attention)."""
    seen: list[str] = []
    for i, step in enumerate(steps):
        t = step.transform
        if t in seen:
            return i, f"{t} applies once per chain"
        if t == "share-kv" and seen:
            return i, f"share-kv needs a stock checkpoint: put it first (it follows {seen[-1]})"
        if t == "absorb-query" and "share-kv" in seen:
            return i, "absorb-query cannot follow share-kv (it needs separate query, key and value projections)"
        if t == "absorb-query" and any(s.startswith("attach-") for s in seen):
            return i, "absorb-query must come before the attach-* steps"
        if "latent-kv" in seen:
            return i, f"{t} cannot follow latent-kv (put latent-kv last)"
        if t == "latent-kv" and seen not in ([], ["share-kv"]):
            return i, f"latent-kv needs a stock or share-kv checkpoint (it follows {seen[-1]})"
        seen.append(t)
    return None


# ---------------------------------------------------------------------------------------------- loading
def _line_of(node, loc: tuple) -> int:
    """1-based line of the deepest YAML node that `loc` reaches (a key's own line for a mapping entry)."""
    import yaml

    line = node.start_mark.line
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            hit = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if hit is None:
                break
            line, node = hit[0].start_mark.line, hit[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line
        else:
            break
    return line + 1


def _compose(text: str, path: Path):
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}:1: a recipe is a mapping (name, base, variants, heal, eval)")
    return node, data


def load_recipe(path: str | Path) -> tuple[Recipe, str]:
    """The validated Recipe of a YAML file, and the file's text; RecipeError (file:line: key: what) otherwise."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror})") from None
    return parse_recipe(text, path), text


def parse_recipe(text: str, path: Path | str = "<recipe>") -> Recipe:
    node, data = _compose(text, Path(path))
    try:
        recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as e:
        err = e.errors()[0]  # one line: the first problem (fix it, run again)
        loc = tuple(err["loc"])
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        where = dotted(loc)
        raise RecipeError(f"{path}:{_line_of(node, loc)}: {where + ': ' if where else ''}{error_message(err)}{more}") \
            from None
    for i, variant in enumerate(recipe.variants):
        if problem := chain_problem(variant.steps):
            j, why = problem
            loc = ("variants", i, "steps", j, variant.steps[j].transform)
            raise RecipeError(f"{path}:{_line_of(node, loc)}: {dotted(loc)}: {why}")
        if variant.train is not None and (recipe.heal is None or variant.heal == "none"):
            loc = ("variants", i, "train")
            raise RecipeError(f"{path}:{_line_of(node, loc)}: {dotted(loc)}: this variant is not healed")
    return recipe
