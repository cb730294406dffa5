"""Label smoothing against the formula written out in float64: (1 - eps) NLL + eps *
mean_k(-log p_k)."""

import pytest
import torch
from conftest import tiny_model

from lmoe.data.encoding import IGNORE
from lmoe.training.objective import set_label_smoothing


def reference(logits, labels, eps):
    logp = torch.log_softmax(logits.double(), -1)[:, :-1]  # position t predicts token t + 1
    target = labels[:, 1:]
    keep = target != IGNORE
    lp, t = logp[keep], target[keep]
    nll = -lp.gather(-1, t[:, None]).squeeze(-1)
    return ((1 - eps) * nll + eps * (-lp.mean(-1))).mean()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.4])
def test_model_loss_is_label_smoothed(eps, input_ids):
    model = tiny_model("llama")
    labels = input_ids.clone()
    labels[:, :3] = IGNORE  # a prompt without loss
    set_label_smoothing(model, eps)
    out = model(input_ids=input_ids, labels=labels)
    torch.testing.assert_close(
        out.loss.double(), reference(out.logits, labels, eps), rtol=1e-5, atol=1e-6
    )


def test_sum_over_num_items_in_batch_as_trainer_asks(input_ids):
    model = tiny_model("llama")
    set_label_smoothing(model, 0.1)
    labels = input_ids.clone()
    n = int((labels[:, 1:] != IGNORE).sum())
    mean = model(input_ids=input_ids, labels=labels).loss
    summed = model(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(2 * n)).loss
    torch.testing.assert_close(summed, mean / 2)


def test_label_smoothing_needs_a_transformers_model():
    with pytest.raises(ValueError, match="label_smoothing=0.1 needs a transformers model"):
        set_label_smoothing(torch.nn.Linear(2, 2), 0.1)
