"""LMoEConfig: every knob of a mixture of LoRA experts, validated when built, saved as JSON; a
peft.PeftConfig, so that PEFT and TRL take it as they take a LoraConfig."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from peft import PeftConfig

from .settings import check_known_keys, setting

ROUTERS = ("softmax", "topk", "dynamic", "remix")
COMPOSITIONS = ("params", "outputs")
EXECUTIONS = ("auto", "dense", "sparse")
ALL_LINEAR = "all-linear"
AUX_COEFS = {
    "load_balance": "load_balance_coef",
    "z_loss": "z_loss_coef",
    "sparsity": "sparsity_coef",
}
# load_balance_coef when left unset: 0.1 for the softmax gate (bench/RESULTS.md, routing study: with
# the routers at 30x it spreads the domains over the experts, I(domain; expert) 0.29 -> 0.37 bit at
# equal quality), the Switch-Transformer 0.01 for top-k; LD-MoLE's released recipe (eshentw/LD-MoLE
# run.sh, lb_loss_coef=1.0) for the dynamic router; none for ReMix, whose paper balances by equal
# weights, not by a loss (one would give its router a gradient besides the RLOO estimate)
LOAD_BALANCE_DEFAULTS = {"softmax": 0.1, "topk": 0.01, "dynamic": 1.0, "remix": 0.0}
REMIX_MAX_TOP_K = 6  # lmoe.remix.MAX_TOP_K: the drawn set's probability sums over its k! orders
LAMBDA_BIAS_INIT = (
    -2.5
)  # the authors' init of every bias of the lambda head (lambda ~ -1.6: dense at first)
# the routers' rate over the experts' under Adam (bench/RESULTS.md, routing study)
ROUTER_PARAM_SCALE = 30.0
# what a saved adapter's config means for a field it lacks: the value before the field existed
SAVED_BEFORE = {"router_param_scale": 1.0}


def default_lambda_hidden(width: int) -> int:
    """LD-MoLE's lambda-head width for a model whose layers read `width` features: width / 8 rounded
    down to a power of two, from 32 to 512. The authors scale the head with the model
    (eshentw/LD-MoLE configs: 128 for Qwen3-0.6B, 256 for Qwen3-1.7B and Llama-3.2-3B, 512 in its
    run.sh for the 3B); a fixed 512 would do five times the arithmetic of the whole adapter on
    a 576-wide model."""
    return max(32, min(512, 1 << max(0, (width // 8).bit_length() - 1)))


PEFT_TYPE = "LMOE"  # adapter_config.json's peft_type: PEFT finds lmoe's config and tuner by it
# peft.PeftConfig's own fields (peft_type, task_type, base_model_name_or_path, ...): what PEFT
# reads from a config. An LMoEConfig holds them for PEFT, but they are not the mixture's: to_dict,
# ==, repr and so lmoe's files leave them out.
PEFT_FIELDS = frozenset(f.name for f in dataclasses.fields(PeftConfig))


class LMoEPeftType(str, enum.Enum):
    """lmoe's member beside PEFT's PeftType (a str enum too: json and PEFT's lookups by "LMOE" find
    it)."""

    LMOE = PEFT_TYPE


def peft_field(default: Any = None) -> Any:
    """One of PeftConfig's fields, declared again in LMoEConfig: keyword-only, so that LMoEConfig's
    positional arguments stay the mixture's (LMoEConfig(4, 8): 4 experts of rank 8), and left out of
    == and repr."""
    return field(default=default, kw_only=True, compare=False, repr=False)


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"LMoEConfig.{name}={value!r} is invalid: expected {expected}.")


@dataclass
class LMoEConfig(PeftConfig):
    """What to inject and how to route. The maths: docs/design.md.

    target_modules: module names (matched against the last part of the dotted name, or the whole
    name), a regex string (full match on the dotted name), or "all-linear" (every linear layer
    but the output head).

    A peft.PeftConfig, so peft.get_peft_model(model, LMoEConfig(...)) and TRL's peft_config= take it
    (lmoe.integrations.peft_tuner is the PEFT method). PeftConfig's fields come first below.
    """

    NOT_SETTINGS = PEFT_FIELDS  # PEFT fills these: not the mixture's settings (lmoe.settings)

    task_type: str | None = peft_field()
    peft_type: LMoEPeftType = peft_field(LMoEPeftType.LMOE)
    auto_mapping: dict | None = peft_field()
    peft_version: str | None = peft_field()
    base_model_name_or_path: str | None = peft_field()
    revision: str | None = peft_field()
    inference_mode: bool = peft_field(False)

    num_experts: int = setting(4, "experts E per adapted layer")
    rank: int = setting(8, "LoRA rank r of each expert")
    alpha: float = setting(16.0, "LoRA alpha: the experts' update is scaled by alpha / rank")
    dropout: float = setting(0.0, "dropout on the experts' input, in training")
    target_modules: list[str] | str = setting(
        factory=lambda: ["q_proj", "v_proj"],
        help="layers to adapt: module names (the last part of the dotted name, or the "
        'whole), a regex (full match on the dotted name), or "all-linear"',
    )
    router: str = setting(
        "softmax",
        "softmax (every expert weighted), topk (the top_k largest), dynamic "
        "(LD-MoLE's sparsegen with a learned per-token lambda), or remix (ReMix: top_k "
        "experts at equal weights, the router trained by RLOO)",
    )
    top_k: int = setting(2, "router=topk or remix: experts per token")
    temperature: float = setting(1.0, "the softmax and top-k gates' temperature")
    composition: str = setting(
        "params",
        "params (L-MoE): one LoRA whose A and B the gate mixes; outputs (MoLoRA): the "
        "gate mixes the experts' outputs",
    )
    router_bias: bool = setting(False, "a bias in the gate W_g")
    # std of the gate W_g's normal init; None: nn.Linear's default (uniform, std 1/sqrt(3 d_in)).
    # Larger values start every token off a non-uniform routing, so the experts see different
    # gradients from step 1.
    router_init_std: float | None = setting(
        None, "std of the gate's normal init; null: nn.Linear's default init"
    )
    # the routers' (gates', lambda heads') parameters are stored divided by this, multiplied by it
    # in use: the same function and init, but Adam's step (about lr, whatever the gradient's size)
    # moves the weights in use this many times as far, so the routers learn at this multiple of the
    # experts' rate in any loop with one learning rate. The experts start at B = 0, so the routers
    # get almost no gradient at first, then one about E times smaller than a single LoRA's: at 1 the
    # routing stays near uniform.
    router_param_scale: float = setting(
        ROUTER_PARAM_SCALE,
        "the routers' parameters are stored divided by this and multiplied back in "
        "use: under Adam the routers learn at this multiple of the experts' rate",
    )
    # true: the router (and LD-MoLE's lambda head) reads the experts' dropped-out input, as the
    # LD-MoLE authors' code does; false: the clean input (no effect without
    # dropout, or at evaluation)
    router_reads_dropout: bool = setting(
        False,
        "the router reads the experts' dropped-out input (as LD-MoLE's code); false: "
        "the clean input",
    )
    load_balance_coef: float | None = setting(
        None,
        "weight of the load-balance loss; null: by router, softmax 0.1, topk 0.01, "
        "dynamic 1.0, remix 0",
    )
    z_loss_coef: float = setting(0.0, "weight of the routers' z-loss (keeps their logits small)")
    # LD-MoLE (router="dynamic"): the sparsity objective keeps at most sparsity_target experts per
    # token; the lambda head is Linear(d_in, lambda_hidden) -> ReLU -> Linear(lambda_hidden, 1), and
    # lambda = logsigmoid(.) + 1 - lambda_eps < 1. Defaults are the authors' released settings;
    # lambda_hidden None: scaled to the model as the authors do
    # (default_lambda_hidden), fixed by inject.
    sparsity_coef: float = setting(0.0, "router=dynamic: weight of the sparsity loss")
    sparsity_target: int = setting(2, "router=dynamic: experts per token the sparsity loss allows")
    lambda_hidden: int | None = setting(
        None,
        "router=dynamic: the lambda head's hidden width; null: scaled to the model "
        "(width / 8, 32 to 512)",
    )
    lambda_eps: float = setting(0.01, "router=dynamic: lambda <= 1 - lambda_eps")
    # every bias of the lambda head at init; the authors' -2.5 gives lambda ~ -1.6
    # (dense), 0 about 0.3
    lambda_bias_init: float = setting(
        LAMBDA_BIAS_INIT,
        "router=dynamic: every bias of the lambda head at init (-2.5: dense at first)",
    )
    # how the experts run (the same values and gradients either way): "dense", every expert for
    # every token as one rank-E*r LoRA; "sparse", only the (token, expert) pairs with g > 0
    # (lmoe/sparse.py); "auto", the faster of the two by the rule measured in bench/RESULTS.md
    # (sparse.prefer_sparse)
    execution: str = setting(
        "auto",
        "how the experts run, the same values either way: dense, sparse (only the "
        "pairs with g > 0), or auto (the measured rule picks)",
    )
    # ReMix (router="remix"): how many routings are drawn per sequence in training, for the RLOO
    # estimator (>= 2); the batch runs as this many copies (this many times the compute)
    remix_samples: int = setting(
        2,
        "router=remix: routings drawn per sequence in training for the RLOO "
        "estimator (>= 2; a step costs this many forwards)",
    )

    def __post_init__(self) -> None:
        super().__post_init__()  # PEFT's checks of its own fields
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if self.load_balance_coef is None:
            self.load_balance_coef = LOAD_BALANCE_DEFAULTS.get(self.router, 0.01)
        self._check_ints()
        self._check_floats()
        self._check_choices()
        self._check_targets()

    def _check_ints(self) -> None:
        for name in (
            "num_experts",
            "rank",
            "top_k",
            "lambda_hidden",
            "sparsity_target",
            "remix_samples",
        ):
            value = getattr(self, name)
            if name == "lambda_hidden" and value is None:  # chosen from the model's width
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                _fail(name, value, "an integer >= 1")
        if self.router in ("topk", "remix") and self.top_k > self.num_experts:
            _fail("top_k", self.top_k, f"an integer from 1 to num_experts={self.num_experts}")
        if self.router == "remix" and self.top_k > REMIX_MAX_TOP_K:
            _fail("top_k", self.top_k, f"at most {REMIX_MAX_TOP_K} with router=remix")
        if self.router == "remix" and self.remix_samples < 2:
            _fail(
                "remix_samples",
                self.remix_samples,
                "an integer >= 2 (RLOO compares each sampled routing with the others)",
            )

    def _check_floats(self) -> None:
        for name in ("alpha", "temperature", "router_param_scale"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                _fail(name, value, "a finite number > 0")
        for name in ("load_balance_coef", "z_loss_coef", "sparsity_coef"):
            value = getattr(self, name)
            if not is_number(value) or value < 0:
                _fail(name, value, "a finite number >= 0")
        if self.router_init_std is not None and (
            not is_number(self.router_init_std) or self.router_init_std < 0
        ):
            _fail(
                "router_init_std",
                self.router_init_std,
                "a finite number >= 0, or null for nn.Linear's init",
            )
        if not is_number(self.dropout) or not 0 <= self.dropout < 1:
            _fail("dropout", self.dropout, "a probability in [0, 1)")
        if not is_number(self.lambda_bias_init):
            _fail("lambda_bias_init", self.lambda_bias_init, "a finite number")
        if not is_number(self.lambda_eps) or not 0 < self.lambda_eps < 1:
            _fail("lambda_eps", self.lambda_eps, "a number in (0, 1) (lambda <= 1 - lambda_eps)")
        if (
            self.router == "dynamic"
            and self.sparsity_coef > 0
            and self.sparsity_target >= self.num_experts
        ):
            _fail(
                "sparsity_target",
                self.sparsity_target,
                f"a number of experts from 1 to num_experts - 1 = {self.num_experts - 1} "
                "(with sparsity_coef > 0; at num_experts the sparsity loss is always 0)",
            )

    def _check_choices(self) -> None:
        if self.router not in ROUTERS:
            _fail("router", self.router, f"one of {', '.join(ROUTERS)}")
        if self.composition not in COMPOSITIONS:
            _fail("composition", self.composition, f"one of {', '.join(COMPOSITIONS)}")
        if self.execution not in EXECUTIONS:
            _fail(
                "execution",
                self.execution,
                f"one of {', '.join(EXECUTIONS)} (auto: the measured rule picks)",
            )
        for name in ("router_bias", "router_reads_dropout"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "true or false")

    def _check_targets(self) -> None:
        targets = self.target_modules
        ok = (isinstance(targets, str) and targets.strip()) or (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
        )
        if not ok:
            _fail(
                "target_modules",
                targets,
                f'a non-empty list of module names, a regex string, or "{ALL_LINEAR}"',
            )
        if isinstance(targets, str) and targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as err:
                _fail("target_modules", targets, f"a valid regular expression ({err})")

    @property
    def scaling(self) -> float:
        """The LoRA scale s = alpha / r."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """The mixture's fields (not PEFT's): adapter_config.json's `config`, a checkpoint's
        `lmoe`."""
        return {name: value for name, value in asdict(self).items() if name not in PEFT_FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LMoEConfig":
        """Build from a mapping; an unknown key is an error that suggests the closest known one."""
        return cls(**check_known_keys(cls, data))

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "LMoEConfig":
        path = Path(text_or_path)
        text = path.read_text() if _looks_like_file(text_or_path) else str(text_or_path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"LMoEConfig JSON is not valid JSON ({err}); fix the file or string."
            ) from err
        if not isinstance(data, dict):
            raise ValueError(
                f"LMoEConfig JSON must be an object of fields, got {type(data).__name__}."
            )
        return cls.from_dict(data)


def saved_fields(data: dict[str, Any]) -> dict[str, Any]:
    """A saved adapter's config fields, each field it lacks at what it meant before the field
    existed (SAVED_BEFORE: router_param_scale 1, the parameters as they were trained), not at
    today's default."""
    return {**SAVED_BEFORE, **data}


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool, NaN or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _looks_like_file(text_or_path: str | Path) -> bool:
    if isinstance(text_or_path, Path):
        return True
    return not text_or_path.lstrip().startswith("{") and Path(text_or_path).is_file()
