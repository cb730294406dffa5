"""The settings of `lmoe eval | generate | analyze | compose | experts ...`, a dataclass each
(`lmoe train`'s: lmoe.training.config.TrainConfig). A setting several commands share has one name,
one default and one help line everywhere, declared once below (model, adapter, group, ...)."""

from __future__ import annotations

from dataclasses import dataclass

from .data.choices import MultipleChoice
from .evaluation.scoring import MAX_ANSWER_TOKENS
from .models import BUILTIN, MODEL_HELP
from .modular.edit import ADDED_EXPERT_LOGIT
from .settings import setting

# Scoring reads more tokens than training (TrainConfig.max_length, 128): a benchmark question with
# its choices, or a long held-out reply, is cut less.
SCORING_MAX_LENGTH = 512


def model_setting():
    return setting(BUILTIN, MODEL_HELP)


def adapter_setting():
    return setting(
        help="adapter directory written by lmoe train, compose or experts; null: the base model "
        "alone"
    )


def data_setting(default_is: str, benchmarks: bool = True):
    sources = ", and benchmarks (bench:NAME, bench:all)" if benchmarks else ""
    return setting(
        factory=list,
        help="JSONL/CSV/JSON/Parquet files (rows grouped by their domain, else the file name, or "
        f"by group){sources}; []: {default_is}",
    )


def group_setting():
    return setting(
        help="group the rows of data files by this key of each row (every row must have it); "
        "null: the row's domain, else the file name"
    )


def max_length_setting():
    return setting(
        SCORING_MAX_LENGTH,
        "tokens per example at most, a longer prompt loses its beginning; 512 here, 128 in lmoe "
        "train: scoring cuts less than training needs to",
    )


def out_setting(what: str, required: bool = True):
    return setting(help=what, required=required)


@dataclass
class EvalConfig:
    """`lmoe eval`."""

    model: str = model_setting()
    adapter: str | None = adapter_setting()
    data: list[str] = data_setting("the built-in mixture's held-out metrics")
    mc: MultipleChoice = setting(
        factory=MultipleChoice, help="how multiple-choice files and benchmarks are scored"
    )
    max_length: int = max_length_setting()
    group: str | None = group_setting()
    max_answer_tokens: int = setting(
        MAX_ANSWER_TOKENS,
        "chat records of data files: greedy exact match for answers of at most this many tokens, "
        "the longer ones perplexity only; 0: perplexity only",
    )
    json: str | None = setting(help="write the results to this file as JSON")
    lm_eval: list[str] = setting(
        factory=list,
        help="lm-eval-harness tasks to score instead of data (pip install lm-eval); results as "
        "lm-eval gives them",
    )
    include_path: str | None = setting(
        help="lm_eval: a folder of task YAMLs, e.g. examples/lm_eval"
    )
    limit: int | None = setting(help="lm_eval: documents per task; null: all")


@dataclass
class GenerateConfig:
    """`lmoe generate`."""

    model: str = model_setting()
    adapter: str | None = adapter_setting()
    prompts: list[str] = setting(factory=list, help="user messages, one reply each")
    prompt_file: str | None = setting(help="a text file of more prompts, one per line")
    max_new_tokens: int = setting(64, "new tokens per reply at most")
    sample: bool = setting(False, "sample instead of greedy decoding")
    temperature: float = setting(1.0, "sample: the softmax temperature of the next token")
    top_p: float = setting(1.0, "sample: nucleus sampling's probability mass")
    seed: int = setting(0, "seed of the sampling")


@dataclass
class AnalyzeConfig:
    """`lmoe analyze`."""

    adapter: str | None = setting(
        help="adapter directory written by lmoe train, compose or experts", required=True
    )
    model: str = model_setting()
    data: list[str] = data_setting(
        "the built-in mixture's held-out skills and domains", benchmarks=False
    )
    group: str | None = group_setting()
    tokens: str = setting(
        "answer",
        "answer: only the answer tokens (all of a text record); all: every real token",
    )
    out: str | None = out_setting(
        "output directory; null: ADAPTER-analysis beside the adapter directory", required=False
    )
    max_length: int = max_length_setting()


@dataclass
class ComposeConfig:
    """`lmoe compose`."""

    adapters: list[str] = setting(
        factory=list,
        help="PEFT LoRA directories (adapter_config.json + adapter_model.safetensors) or "
        "single-expert lmoe adapters, trained on one base: one expert each",
        required=True,
    )
    model: str = model_setting()
    out: str | None = out_setting("mixture adapter directory to write (use it as adapter=)")
    router: str = setting("softmax", "softmax, topk, dynamic or remix (as lmoe.router)")
    composition: str = setting(
        "outputs",
        "outputs here (lmoe.composition's default is params): one-hot routing then reproduces "
        "each adapter exactly; params mixes their A and B",
    )


def mixture_setting():
    return setting(
        help="adapter directory written by lmoe train, compose or experts", required=True
    )


@dataclass
class ExpertsListConfig:
    """`lmoe experts list`."""

    mixture: str | None = mixture_setting()
    json: str | None = setting(help="write the description to this file as JSON")


@dataclass
class ExpertsEditConfig:
    """What every edit of a mixture's experts reads and writes."""

    mixture: str | None = mixture_setting()
    model: str = model_setting()
    out: str | None = out_setting("adapter directory to write (may be the mixture itself)")


@dataclass
class ExpertsAddConfig(ExpertsEditConfig):
    """`lmoe experts add`."""

    adapters: list[str] = setting(
        factory=list,
        help="LoRA adapter directories of the same base (PEFT's, or lmoe train's at "
        "lmoe.num_experts=1), one new expert each",
    )
    fresh: int = setting(
        0, "this many fresh experts (LoRA init, B = 0) too, to train with frozen_experts=[...]"
    )
    logit: float = setting(
        ADDED_EXPERT_LOGIT,
        "the new router rows' bias below the mean row: weight <= e^logit, and they learn; -1e4 "
        "keeps every output exactly, but the new experts then get no gradient",
    )
    seed: int = setting(0, "seed of the fresh experts' A")


@dataclass
class ExpertsRemoveConfig(ExpertsEditConfig):
    """`lmoe experts remove`."""

    experts: list[int] = setting(
        factory=list, help="expert indices to drop (see lmoe experts list)", required=True
    )


@dataclass
class ExpertsReplaceConfig(ExpertsEditConfig):
    """`lmoe experts replace`."""

    expert: int | None = setting(
        help="index of the expert to replace (see lmoe experts list)", required=True
    )
    adapter: str | None = setting(
        help="LoRA adapter directory to put in its slot (PEFT's, or lmoe train's at "
        "lmoe.num_experts=1)",
        required=True,
    )


@dataclass
class ConfigConfig:
    """`lmoe config COMMAND`."""

    out: str | None = out_setting("write the YAML file here; null: print it", required=False)
