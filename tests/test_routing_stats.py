"""lmoe.routing_stats against hand-computed distributions and the joint-distribution (KL) form of
I(domain; expert)."""

import math

import pytest
import torch

from lmoe.routing_stats import (
    TOKEN_STATISTICS,
    effective_support_size,
    entropy_bits,
    group_by_label,
    mutual_information,
    normalised_entropy,
    per_token_labels,
    routing_stats,
    specialisation,
    token_statistics,
)


def mi_from_joint(usage: torch.Tensor, tokens: torch.Tensor) -> float:
    """Independent reference: I = sum_{d,e} p(d,e) log2(p(d,e) / (p(d) p(e))), p(d,e) =
    p(d) usage[d, e]."""
    p_d = tokens.double() / tokens.sum()
    joint = p_d[:, None] * usage.double()
    p_e = joint.sum(0)
    return sum(
        joint[d, e].item() * math.log2(joint[d, e].item() / (p_d[d].item() * p_e[e].item()))
        for d in range(joint.shape[0])
        for e in range(joint.shape[1])
        if joint[d, e] > 0
    )


def test_normalised_entropy_of_known_vectors():
    g = torch.tensor(
        [[0.25, 0.25, 0.25, 0.25], [1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.7, 0.2, 0.1, 0.0]]
    )
    hand = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)) / math.log(4)
    torch.testing.assert_close(normalised_entropy(g), torch.tensor([1.0, 0.0, 0.5, hand]))
    assert normalised_entropy(torch.ones(3, 1)).tolist() == [
        0.0,
        0.0,
        0.0,
    ]  # one expert: nothing to choose


def test_token_statistics_count_active_experts_entropy_and_confident_tokens():
    g = torch.tensor([[0.5, 0.5, 0.0], [0.6, 0.4, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0]])
    stats = token_statistics(g)
    assert stats[:, 0].tolist() == [2, 2, 3, 1]
    assert stats[:, 2].tolist() == [0, 1, 0, 1]  # top weight strictly above 0.5
    torch.testing.assert_close(
        stats[:, 1],
        torch.tensor(
            [
                math.log(2) / math.log(3),
                -(0.6 * math.log(0.6) + 0.4 * math.log(0.4)) / math.log(3),
                1,
                0,
            ]
        ),
    )


def test_effective_support_size_and_top_share_of_hand_computed_vectors():
    # ReMix's ESS = (sum_i |g_i|)^2 / sum_i g_i^2, worked out by hand for each row
    g = torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0],  # one-hot: 1^2 / 1 = 1
            [0.25, 0.25, 0.25, 0.25],  # uniform: 1 / (4 * 1/16) = 4
            [0.5, 0.5, 0.0, 0.0],  # equal on two: 1 / (2 * 1/4) = 2
            [0.7, 0.2, 0.1, 0.0],  # 1 / (0.49 + 0.04 + 0.01) = 1 / 0.54
            [0.125, 0.0, 0.125, 0.125],  # constant weights (1/8) on three: 0.375^2 / (3/64) = 3
            [0.0, 0.0, 0.0, 0.0],  # no weight: 0 (ESS is defined for g != 0)
        ]
    )
    torch.testing.assert_close(
        effective_support_size(g), torch.tensor([1.0, 4.0, 2.0, 1 / 0.54, 3.0, 0.0])
    )
    stats = token_statistics(g)
    assert list(TOKEN_STATISTICS) == [
        "active_experts",
        "routing_entropy",
        "top_weight_over_half",
        "effective_support_size",
        "top_expert_share",
    ]
    torch.testing.assert_close(stats[:, 3], effective_support_size(g))
    # the top expert's share of the mass: max_i g_i / sum_i g_i (the constant weights: 1/3)
    torch.testing.assert_close(stats[:, 4], torch.tensor([1.0, 0.25, 0.5, 0.7, 1 / 3, 0.0]))
    # the constant weights read as shares: entropy log 3 / log 4, top share 1/3 <= 0.5
    torch.testing.assert_close(stats[4, 1], torch.tensor(math.log(3) / math.log(4)))
    assert stats[:, 2].tolist() == [1, 0, 0, 1, 0, 0]
    assert stats[:, 0].tolist() == [1, 4, 2, 3, 3, 0]


def test_effective_support_size_does_not_depend_on_the_scale_of_the_weights():
    g = torch.rand(20, 6, generator=torch.Generator().manual_seed(1)) ** 3
    shares = g / g.sum(-1, keepdim=True)
    torch.testing.assert_close(token_statistics(0.37 * g), token_statistics(shares))
    inverse_simpson = 1 / (shares.double() ** 2).sum(-1)  # the same count for weights summing to 1
    torch.testing.assert_close(
        effective_support_size(g).double(), inverse_simpson, rtol=1e-6, atol=0
    )


def test_entropy_bits_of_known_distributions():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    torch.testing.assert_close(
        entropy_bits(p), torch.tensor([1.0, 0.0, 0.8112781244591328], dtype=torch.float64)
    )


def test_mutual_information_of_hand_cases():
    two = torch.tensor([10, 10])
    assert mutual_information(torch.eye(2), two).item() == pytest.approx(
        1.0
    )  # one expert per domain: 1 bit
    assert mutual_information(torch.full((2, 2), 0.5), two).item() == pytest.approx(
        0.0, abs=1e-12
    )  # uniform
    same = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    assert mutual_information(same, two).item() == pytest.approx(
        0.0, abs=1e-12
    )  # alike, though not uniform
    # unequal shares, one expert each: I = H(domain) = H(0.25, 0.75)
    assert mutual_information(torch.eye(2), torch.tensor([1, 3])).item() == pytest.approx(
        0.8112781244591328
    )
    assert mutual_information(torch.eye(4), torch.full((4,), 5)).item() == pytest.approx(2.0)


def test_mutual_information_matches_the_joint_distribution_form():
    gen = torch.Generator().manual_seed(0)
    for domains, E in [(2, 2), (5, 4), (11, 8)]:
        usage = torch.rand(domains, E, generator=gen, dtype=torch.float64) ** 3
        usage /= usage.sum(-1, keepdim=True)
        tokens = torch.randint(1, 50, (domains,), generator=gen)
        assert mutual_information(usage, tokens).item() == pytest.approx(
            mi_from_joint(usage, tokens), abs=1e-12
        )


def layers_for(domains_tokens: list[int]) -> dict[str, torch.Tensor]:
    """Two layers for domains a, b: "split" routes a to expert 0 and b to expert 1,
    "flat" is uniform."""
    a, b = domains_tokens
    return {
        "split": torch.cat(
            [torch.tensor([[1.0, 0.0]]).repeat(a, 1), torch.tensor([[0.0, 1.0]]).repeat(b, 1)]
        ),
        "flat": torch.full((a + b, 2), 0.5),
    }


def test_specialisation_per_layer_and_averaged():
    out = specialisation(layers_for([3, 3]), ["a"] * 3 + ["b"] * 3)
    split, flat = out["layers"]["split"], out["layers"]["flat"]
    assert (
        split["mutual_information_bits"] == pytest.approx(1.0)
        and flat["mutual_information_bits"] == 0
    )
    assert (split["routing_entropy"], flat["routing_entropy"]) == (0, 1)
    assert (split["top_weight_over_half"], flat["top_weight_over_half"]) == (1, 0)
    assert (split["mean_active_experts"], flat["mean_active_experts"]) == (1, 2)
    # one-hot: ESS 1, all the mass on the top expert; [0.5, 0.5]: ESS 2, half of it
    assert (split["effective_support_size"], flat["effective_support_size"]) == (1, 2)
    assert (split["top_expert_share"], flat["top_expert_share"]) == (1, 0.5)
    assert split["expert_load"] == split["expert_top1_share"] == [0.5, 0.5]
    assert flat["expert_top1_share"] == [1.0, 0.0]  # ties go to the lowest index
    assert (
        out["mutual_information_bits"] == pytest.approx(0.5)
        and out["mutual_information_max_bits"] == 1
    )
    assert (
        out["routing_entropy"] == 0.5
        and out["top_weight_over_half"] == 0.5
        and out["mean_active_experts"] == 1.5
    )
    assert out["effective_support_size"] == 1.5 and out["top_expert_share"] == 0.75
    assert out["tokens"] == {"a": 3, "b": 3}
    assert out["groups"]["a"]["expert_usage"] == [0.75, 0.25]  # mean over the two layers


def test_collapse_statistics_are_means_over_the_tokens_of_all_groups():
    # layer "l": a's 3 tokens one-hot (ESS 1), b's token uniform over 4 (ESS 4);
    # layer "m": every token [.5, .5, 0, 0] (ESS 2)
    one_hot, uniform = torch.tensor([1.0, 0, 0, 0]), torch.full((4,), 0.25)
    g = torch.stack([one_hot, one_hot, one_hot, uniform])
    out = specialisation({"l": g, "m": torch.tensor([0.5, 0.5, 0, 0]).repeat(4, 1)}, list("aaab"))
    layer_l, layer_m = out["layers"]["l"], out["layers"]["m"]
    assert layer_l["effective_support_size"] == pytest.approx((3 * 1 + 4) / 4)
    assert layer_l["top_expert_share"] == pytest.approx((3 * 1 + 0.25) / 4)
    assert (layer_m["effective_support_size"], layer_m["top_expert_share"]) == (2, 0.5)
    assert out["effective_support_size"] == pytest.approx((7 / 4 + 2) / 2)  # mean over layers
    assert out["top_expert_share"] == pytest.approx((3.25 / 4 + 0.5) / 2)


def test_specialisation_weighs_domains_by_their_tokens():
    out = specialisation(layers_for([1, 3]), ["a", "b", "b", "b"])
    assert out["layers"]["split"]["mutual_information_bits"] == pytest.approx(0.8112781244591328)
    assert out["layers"]["split"]["expert_load"] == [0.25, 0.75]


def test_confident_tokens_that_average_to_uniform_carry_no_domain_information():
    g = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    )  # each domain: half on each expert
    layer = specialisation({"l": g}, ["a", "a", "b", "b"])["layers"]["l"]
    assert layer["mutual_information_bits"] == 0 and layer["routing_entropy"] == 0


def test_labels_per_example_and_their_checks():
    assert per_token_labels(["x", "y"], [2, 1]) == ["x", "x", "y"]
    with pytest.raises(ValueError, match="one label per example"):
        per_token_labels(["x"], [2, 1])
    with pytest.raises(ValueError, match="one label per recorded token"):
        group_by_label({"l": torch.ones(3, 2) / 2}, ["a", "b"])
    groups = group_by_label({"l": torch.arange(6.0).view(3, 2)}, ["b", "a", "b"])
    assert list(groups) == ["b", "a"] and groups["b"]["l"].tolist() == [[0, 1], [4, 5]]


def test_empty_groups_are_dropped_and_no_tokens_is_an_error():
    stats = routing_stats({"a": {"l": torch.eye(2)}, "empty": {"l": torch.zeros(0, 2)}})
    assert stats.groups == ["a"] and stats.mutual_info.tolist() == [0.0]
    with pytest.raises(ValueError, match="No routed tokens"):
        routing_stats({"empty": {"l": torch.zeros(0, 2)}})
