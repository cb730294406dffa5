"""lm-eval-harness on an lmoe model: its HFLM wraps the model in memory, experts and per-token
routing as trained (PeftModel.from_pretrained through HFLM(peft=DIR) works too, once
lmoe is imported)."""

from __future__ import annotations

from torch import nn

LM_EVAL_PIN = "lm-eval==0.4.13"  # the version tested (tests/test_lm_eval.py)


def lm_eval_results(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    include_path: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict:
    """lm_eval.simple_evaluate of tasks on the model; include_path: a folder of task YAMLs
    (examples/lm_eval)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(
            f"lm-eval-harness is not installed ({err}); pip install '{LM_EVAL_PIN}'."
        ) from err
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size, device=device)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        limit=limit,
        task_manager=TaskManager(include_path=include_path),
    )


def lm_eval_table(results: dict) -> str:
    """lm-eval's own results table."""
    from lm_eval.utils import make_table

    return make_table(results)
