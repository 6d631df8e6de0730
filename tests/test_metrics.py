"""hf_smooth.metrics and hf_smooth.calibration against hand arithmetic and the float64 oracle of metric_oracles.py."""

from __future__ import annotations

import json
import math
import threading

import pytest
import torch
from metric_oracles import oracle_equal_mass_ece, oracle_metrics, oracle_nll

from hf_smooth.calibration import TemperatureResult, fit_temperature, fit_temperature_from_batches
from hf_smooth.metrics import DEFAULT_GAP_EDGES, TokenMetrics, equal_mass_ece, sequence_statistics

KEYS = ("nll", "ppl", "accuracy", "confidence", "ece", "ece_adaptive", "brier", "entropy", "logit_gap", "logit_norm",
        "small_logit_frac")


pytestmark = pytest.mark.usefixtures("one_thread")


def random_batch(shape, num_classes, *, seed, scale=2.0, ignore_share=0.3, ignore_index=-100, dtype=torch.float64,
                 neginf_share=0.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, num_classes, generator=g, dtype=torch.float64) * scale)
    labels = torch.randint(0, num_classes, shape, generator=g)
    if neginf_share:
        absent = torch.rand(*shape, num_classes, generator=g) < neginf_share
        absent.scatter_(-1, labels.unsqueeze(-1), False)  # the label itself stays present
        logits = logits.masked_fill(absent, -math.inf)
    ignored = torch.rand(shape, generator=g) < ignore_share
    labels = labels.masked_fill(ignored, ignore_index)
    logits = logits.masked_fill(ignored.unsqueeze(-1), math.nan)  # garbage where nothing is scored
    return logits.to(dtype), labels


def assert_close(result: dict, expected: dict, *, rel=1e-9, abs=1e-12, keys=KEYS):
    checked = [k for k in keys if k in expected]
    assert checked, "nothing compared"
    for key in checked:
        assert result[key] == pytest.approx(expected[key], rel=rel, abs=abs), key
    assert result["num_tokens"] == expected["num_tokens"]


# ---- hand-computed cases ---------------------------------------------------------------------------------------


def test_hand_computed_small_case():
    # Four scored tokens over K = 3 with logits log(p), so softmax(z) = p; a fifth position is ignored (NaN logits).
    probs = [
        [0.70, 0.20, 0.10],  # label 0: correct, confidence 0.70
        [0.50, 0.30, 0.20],  # label 1: wrong,   confidence 0.50
        [0.10, 0.15, 0.75],  # label 2: correct, confidence 0.75
        [0.45, 0.30, 0.25],  # label 2: wrong,   confidence 0.45
    ]
    labels = torch.tensor([0, 1, 2, 2, -100])
    logits = torch.tensor(probs, dtype=torch.float64).log()
    logits = torch.cat([logits, torch.full((1, 3), math.nan, dtype=torch.float64)])
    m = TokenMetrics(num_bins=5).update(logits, labels).compute()

    assert m["num_tokens"] == 4
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["confidence"] == pytest.approx((0.70 + 0.50 + 0.75 + 0.45) / 4)  # 0.6
    nll = -(math.log(0.70) + math.log(0.30) + math.log(0.75) + math.log(0.25)) / 4
    assert m["nll"] == pytest.approx(nll)
    assert m["ppl"] == pytest.approx(math.exp(nll))
    # Multiclass Brier per token: sum_k (p_k - onehot_k)^2
    #   0.3^2 + 0.2^2 + 0.1^2 = 0.14;  0.5^2 + 0.7^2 + 0.2^2 = 0.78
    #   0.1^2 + 0.15^2 + 0.25^2 = 0.095; 0.45^2 + 0.3^2 + 0.75^2 = 0.855
    assert m["brier"] == pytest.approx((0.14 + 0.78 + 0.095 + 0.855) / 4)  # 0.4675
    # Five bins (0,.2], (.2,.4], (.4,.6], (.6,.8], (.8,1]:
    #   (.4,.6]: 0.50 and 0.45, both wrong -> |0 - 0.95| = 0.95
    #   (.6,.8]: 0.70 and 0.75, both right -> |2 - 1.45| = 0.55
    assert m["ece"] == pytest.approx((0.95 + 0.55) / 4)  # 0.375
    # Equal mass, 5 bins for 4 tokens: one token per group -> sum |correct_i - conf_i| / 4
    #   |1 - .7| + |0 - .5| + |1 - .75| + |0 - .45| = 0.3 + 0.5 + 0.25 + 0.45 = 1.5
    assert m["ece_adaptive"] == pytest.approx(1.5 / 4)
    entropy = sum(-sum(q * math.log(q) for q in row) for row in probs) / 4
    assert m["entropy"] == pytest.approx(entropy)
    logs = [[math.log(q) for q in row] for row in probs]
    assert m["logit_gap"] == pytest.approx(sum(max(r) - sum(r) / 3 for r in logs) / 4)
    assert m["logit_norm"] == pytest.approx(sum(math.sqrt(sum(v * v for v in r)) for r in logs) / 4)
    assert m["small_logit_frac"] == 0.0  # no |log p| below 0.01

    bins = TokenMetrics(num_bins=5).update(logits, labels).reliability()
    assert bins["count"] == [0, 0, 2, 2, 0]
    assert bins["confidence"][2:4] == pytest.approx([0.475, 0.725])
    assert bins["accuracy"] == pytest.approx([0, 0, 0, 1, 0])


def test_small_logit_share_and_masked_vocabulary_by_hand():
    inf = math.inf
    # Token 1: logits [0.005, -0.02, 2, -inf]: 3 finite entries, one with |z| < 0.01.
    # Token 2: logits [0, 0, 0, 0]: 4 finite entries, all small; uniform p.
    logits = torch.tensor([[0.005, -0.02, 2.0, -inf], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([2, 1])
    m = TokenMetrics(num_bins=4).update(logits, labels).compute()
    assert m["small_logit_frac"] == pytest.approx((1 + 4) / (3 + 4))
    gap1 = 2.0 - (0.005 - 0.02 + 2.0) / 3  # the -inf entry is absent from the mean
    assert m["logit_gap"] == pytest.approx((gap1 + 0.0) / 2)
    norm1 = math.sqrt(0.005**2 + 0.02**2 + 4.0)
    assert m["logit_norm"] == pytest.approx(norm1 / 2)
    e = [math.exp(v) for v in (0.005, -0.02, 2.0)]
    p1 = [v / sum(e) for v in e]
    h1 = -sum(q * math.log(q) for q in p1)
    assert m["entropy"] == pytest.approx((h1 + math.log(4)) / 2)
    # Token 2 is a tie: argmax is the first entry (0), label 1 -> wrong; token 1 right.
    assert m["accuracy"] == 0.5
    brier1 = (1 - p1[2]) ** 2 + p1[0] ** 2 + p1[1] ** 2
    brier2 = 0.75**2 + 3 * 0.25**2
    assert m["brier"] == pytest.approx((brier1 + brier2) / 2)


def test_equal_mass_ties_are_split_by_sorted_position():
    # Sorted by (confidence, correct): (.2,0) (.6,0) | (.6,1) (.9,1)   -> 2 groups of 2
    #   |0 - 0.8| + |2 - 1.5| = 1.3 -> 1.3 / 4 = 0.325
    # (Putting the correct tie first would give |1 - .8| + |1 - 1.5| = 0.7 -> 0.175.)
    conf = torch.tensor([0.6, 0.9, 0.2, 0.6])
    correct = torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert equal_mass_ece(conf, correct, 2) == pytest.approx(0.325)
    assert oracle_equal_mass_ece(conf.numpy(), correct.numpy(), 2) == pytest.approx(0.325)
    for seed in range(5):  # a function of the multiset only
        perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
        assert equal_mass_ece(conf[perm], correct[perm], 2) == pytest.approx(0.325)


def test_equal_mass_remainder_goes_to_the_first_groups():
    # N = 5, M = 3 -> sizes 2, 2, 1 (numpy.array_split):
    #   [.1 .2] |0 - .3| = .3;  [.3 .4] |2 - .7| = 1.3;  [.5] |1 - .5| = .5  -> 2.1 / 5 = 0.42
    # (Sizes 1, 2, 2 would give 1.7 / 5 = 0.34.)
    conf = torch.tensor([0.5, 0.1, 0.4, 0.2, 0.3])
    correct = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    assert equal_mass_ece(conf, correct, 3) == pytest.approx(0.42)
    assert oracle_equal_mass_ece(conf.numpy(), correct.numpy(), 3) == pytest.approx(0.42)
    # Fewer tokens than bins: every token alone, the other groups empty.
    assert equal_mass_ece(conf[:2], correct[:2], 15) == pytest.approx((0.5 + 0.1) / 2)
    assert equal_mass_ece(torch.zeros(0), torch.zeros(0), 15) == 0.0


def test_equal_width_bins_are_right_closed():
    # Confidences exactly on an edge (binary fractions, no rounding): 0.5 -> (.25,.5], 0.75 -> (.5,.75], 1 -> (.75,1].
    # logits [0, -inf] give p = [1, 0]; [0, 0] gives [.5, .5]; [log 3, 0] gives [.75, .25].
    logits = torch.tensor([[0.0, -math.inf], [0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    rel = TokenMetrics(num_bins=4).update(logits, labels).reliability()
    assert rel["count"] == [0, 1, 1, 1]


# ---- the oracle on random data ---------------------------------------------------------------------------------

CASES = [
    # shape, K, dtype, ignore_index, chunk_size, neginf share
    ((1,), 2, torch.float64, -100, None, 0.0),
    ((3, 17), 41, torch.float64, -100, 5, 0.0),
    ((2, 9), 5, torch.float64, 0, 1, 0.0),
    ((64,), 7, torch.float64, -1, 13, 0.0),
    ((4, 50), 33, torch.float64, -100, 7, 0.2),
    ((4, 50), 33, torch.float32, -100, None, 0.0),
    ((4, 50), 33, torch.bfloat16, -100, 16, 0.1),
    ((2, 300), 64, torch.float16, -100, None, 0.0),
]


@pytest.mark.parametrize("shape,k,dtype,ignore_index,chunk_size,neginf", CASES)
def test_matches_float64_oracle(shape, k, dtype, ignore_index, chunk_size, neginf):
    logits, labels = random_batch(shape, k, seed=k + len(shape), dtype=dtype, ignore_index=ignore_index,
                                  ignore_share=0.2 if ignore_index != 0 and len(shape) > 1 else 0.0,
                                  neginf_share=neginf)
    if ignore_index == 0:
        labels = labels.masked_fill(labels == 1, 0)  # class 0 is the ignore value here
        labels[..., 0] = 2
    metrics = TokenMetrics(ignore_index=ignore_index, chunk_size=chunk_size).update(logits, labels)
    result = metrics.compute()
    # The oracle sees exactly the same (upcast) numbers; float32 arithmetic costs ~1e-6 relative.
    expected = oracle_metrics(logits.double(), labels, ignore_index=ignore_index, gap_edges=DEFAULT_GAP_EDGES)
    assert expected["num_tokens"] > 0
    tol = dict(rel=1e-9, abs=1e-12) if dtype == torch.float64 else dict(rel=2e-5, abs=2e-6)
    assert_close(result, expected, **tol)
    rel = metrics.reliability()
    assert rel["count"] == expected["bin_count"]
    assert rel["confidence"] == pytest.approx(expected["bin_confidence"], **tol)
    assert rel["accuracy"] == pytest.approx(expected["bin_accuracy"], **tol)
    assert metrics.logit_gap_histogram()["count"] == expected["gap_count"]


def test_gap_histogram_catches_out_of_range_values():
    logits, labels = random_batch((300,), 6, seed=3, scale=1.0, ignore_share=0.0)
    edges = (0.5, 1.0, 1.5, 2.0)
    m = TokenMetrics(gap_edges=edges).update(logits, labels)
    expected = oracle_metrics(logits, labels, gap_edges=edges)["gap_count"]
    counts = m.logit_gap_histogram()["count"]
    assert counts == expected and sum(counts) == 300
    assert counts[0] > 0 and counts[-1] > 0


# ---- streaming, merging, per-sequence statistics ------------------------------------------------------------------


def full_and_batches(seed=0):
    logits, labels = random_batch((10, 23), 19, seed=seed)
    splits = [(0, 1), (1, 4), (4, 5), (5, 10)]  # uneven, one batch of one sequence
    return logits, labels, [(logits[a:b], labels[a:b]) for a, b in splits]


def test_streaming_uneven_batches_equals_all_at_once():
    logits, labels, batches = full_and_batches()
    whole = TokenMetrics().update(logits, labels).compute()
    streamed = TokenMetrics()
    for z, y in batches:
        streamed.update(z, y)
    assert_close(streamed.compute(), whole, rel=1e-12)
    # A batch that is all ignored changes nothing.
    streamed.update(torch.full((2, 5, 19), math.nan, dtype=torch.float64), torch.full((2, 5), -100))
    assert_close(streamed.compute(), whole, rel=1e-12)


def test_merge_equals_all_at_once_in_any_order():
    logits, labels, batches = full_and_batches(seed=1)
    whole = TokenMetrics().update(logits, labels).compute()
    parts = [TokenMetrics().update(z, y) for z, y in batches]
    forward = TokenMetrics()
    for part in parts:
        forward.merge(part)
    backward = TokenMetrics()
    for part in reversed(parts):
        backward.merge(part)
    assert_close(forward.compute(), whole, rel=1e-12)
    assert_close(backward.compute(), whole, rel=1e-12)
    assert parts[0].num_tokens == TokenMetrics().update(*batches[0]).num_tokens  # merge did not touch its argument
    with pytest.raises(ValueError, match="layouts"):
        TokenMetrics(num_bins=10).merge(parts[0])


def test_sequence_statistics_padded_and_truncated_like_gather_for_metrics():
    logits, labels, batches = full_and_batches(seed=2)
    token_loss = torch.rand(labels.shape, dtype=torch.float64).masked_fill(labels == -100, math.nan)
    whole = TokenMetrics().update(logits, labels, token_loss=token_loss).compute()
    acc = TokenMetrics()
    for (a, b) in [(0, 3), (3, 10)]:
        stats = sequence_statistics(logits[a:b], labels[a:b], token_loss[a:b], layout=acc.layout)
        assert stats["sums"].shape == (b - a, acc.layout.size)
        assert stats["pairs"].shape == (b - a, 23, 2)
        # What pad_across_processes(dim=1, pad_index=-1) does when another rank has longer sequences.
        stats["pairs"] = torch.cat([stats["pairs"], torch.full((b - a, 4, 2), -1.0, dtype=torch.float64)], dim=1)
        acc.add(stats)
    result = acc.compute()
    assert_close(result, whole, rel=1e-12)
    assert result["loss"] == pytest.approx(token_loss[labels != -100].mean().item(), rel=1e-12)
    # Per-sequence sums really are per sequence: sequence 4 alone.
    one = sequence_statistics(logits[4:5], labels[4:5], layout=acc.layout)
    alone = TokenMetrics().update(logits[4], labels[4])
    assert torch.allclose(one["sums"][0], alone._sums, rtol=1e-12, atol=0)


def test_sequence_statistics_without_diagnostics_and_classification_shape():
    logits, labels = random_batch((12,), 4, seed=5)
    acc = TokenMetrics(diagnostics=False)
    stats = sequence_statistics(logits, labels, layout=acc.layout)
    assert set(stats) == {"sums"} and stats["sums"].shape == (12, acc.layout.size)
    result = acc.add(stats).compute()
    assert set(result) == {"nll", "ppl", "accuracy", "confidence", "logit_gap", "num_tokens"}
    expected = oracle_metrics(logits, labels)
    assert_close(result, expected, keys=("nll", "accuracy", "confidence", "logit_gap"))
    with pytest.raises(ValueError, match="layout"):
        TokenMetrics().add(stats)


def test_ignored_positions_never_counted():
    logits, labels = random_batch((6, 11), 9, seed=7, ignore_share=0.5)
    keep = labels != -100
    poisoned = logits.clone()
    poisoned[~keep] = torch.tensor([math.inf, -math.inf, math.nan] * 3, dtype=torch.float64)
    result = TokenMetrics().update(poisoned, labels).compute()
    clean = TokenMetrics().update(logits[keep], labels[keep]).compute()
    assert_close(result, clean, rel=1e-12)
    assert all(math.isfinite(v) for v in result.values())
    assert result["num_tokens"] == int(keep.sum())

    empty = TokenMetrics().update(poisoned, torch.full_like(labels, -100))
    out = empty.compute()
    assert out["num_tokens"] == 0 and out["ppl"] == 1.0
    assert all(v == 0.0 for k, v in out.items() if k not in ("ppl", "num_tokens"))
    assert sum(empty.reliability()["count"]) == 0


def test_temperature_argument_equals_divided_logits_and_bad_inputs():
    logits, labels = random_batch((5, 8), 6, seed=11)
    scaled = TokenMetrics().update(logits, labels, temperature=2.5).compute()
    divided = TokenMetrics().update(logits / 2.5, labels).compute()
    assert_close(scaled, divided, rel=1e-12)
    m = TokenMetrics()
    with pytest.raises(ValueError, match="temperature"):
        m.update(logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="out of range"):
        m.update(logits, labels.masked_fill(labels == 0, 6))
    with pytest.raises(ValueError, match="Shape mismatch"):
        m.update(logits, labels[:, :-1])
    with pytest.raises(ValueError, match="token_loss"):
        m.update(logits, labels, token_loss=torch.zeros(5))
    with pytest.raises(ValueError, match="num_bins"):
        TokenMetrics(num_bins=0)
    with pytest.raises(ValueError, match="gap_edges"):
        TokenMetrics(gap_edges=[1.0, 1.0])
    m.update(logits, labels, token_loss=torch.zeros(5, 8))
    m.update(logits, labels)
    with pytest.raises(ValueError, match="every update or none"):
        m.compute()


def test_without_adaptive_ece_no_pairs_are_kept():
    logits, labels = random_batch((4, 9), 5, seed=12)
    m = TokenMetrics(adaptive_ece=False).update(logits, labels)
    assert "ece_adaptive" not in m.compute() and m.token_pairs().shape == (0, 2)
    assert sequence_statistics(logits, labels, layout=m.layout).keys() == {"sums"}


# ---- saving --------------------------------------------------------------------------------------------------------


def test_json_round_trip(tmp_path):
    logits, labels, batches = full_and_batches(seed=3)
    m = TokenMetrics().update(logits, labels)
    path = m.save(tmp_path / "sub" / "eval.json")
    restored = TokenMetrics.load(path)
    assert restored.compute() == m.compute()
    assert restored.reliability() == m.reliability()
    assert restored.logit_gap_histogram() == m.logit_gap_histogram()
    saved = json.loads(path.read_text())
    assert saved["metrics"] == m.compute() and "token_confidence" not in saved
    with pytest.raises(ValueError, match="pairs"):  # the equal-mass ECE is not a sum: no merge without the pairs
        restored.merge(TokenMetrics())

    full = TokenMetrics.from_dict(json.loads(json.dumps(m.to_dict(include_token_pairs=True))))
    full.merge(TokenMetrics().update(logits, labels))
    doubled = TokenMetrics().update(logits, labels).update(logits, labels).compute()
    assert_close(full.compute(), doubled, rel=1e-12)
    with pytest.raises(ValueError, match="format"):
        TokenMetrics.from_dict({"sums": []})


# ---- gather across ranks -------------------------------------------------------------------------------------------


class _Collective:
    """What torch.distributed gives every rank: each deposits a value, all read all of them."""

    def __init__(self, world_size):
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots = [None] * world_size

    def exchange(self, rank, value):
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values


class StubAccelerator:
    """The accelerate.Accelerator methods TokenMetrics.gather uses, with real collective semantics over threads."""

    def __init__(self, rank, world_size, collective):
        self.process_index, self.num_processes, self.collective = rank, world_size, collective
        self.device = torch.device("cpu")
        self.calls = []

    def reduce(self, tensor, reduction="sum"):
        self.calls.append("reduce")
        assert reduction == "sum"
        return torch.stack(self.collective.exchange(self.process_index, tensor.clone())).sum(dim=0)

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        self.calls.append("pad_across_processes")
        longest = max(self.collective.exchange(self.process_index, tensor.shape[dim]))
        pad = list(tensor.shape)
        pad[dim] = longest - tensor.shape[dim]
        return torch.cat([tensor, torch.full(pad, pad_index, dtype=tensor.dtype)], dim=dim)

    def gather(self, tensor):
        self.calls.append("gather")
        parts = self.collective.exchange(self.process_index, tensor)
        assert len({p.shape for p in parts}) == 1, "torch.distributed.all_gather needs equal shapes"
        return torch.cat(parts, dim=0)


@pytest.mark.parametrize("rank_batches", [[(0, 3), (3, 10)], [(0, 10), (10, 10)]], ids=["uneven", "one-rank-empty"])
def test_gather_over_two_ranks_with_stub_accelerator(rank_batches):
    logits, labels, _ = full_and_batches(seed=4)
    whole = TokenMetrics().update(logits, labels)
    collective = _Collective(2)
    results, accelerators, errors = [None, None], [], []

    def rank_main(rank):
        try:
            a, b = rank_batches[rank]
            local = TokenMetrics().update(logits[a:b], labels[a:b])
            accelerator = StubAccelerator(rank, 2, collective)
            accelerators.append(accelerator)
            results[rank] = local.gather(accelerator)
        except Exception as error:  # surfaced below; a failing thread must not hang the other one
            errors.append(error)
            collective.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for result in results:
        assert_close(result.compute(), whole.compute(), rel=1e-12)
        for key, values in whole.reliability().items():
            assert result.reliability()[key] == pytest.approx(values, rel=1e-12), key
    assert results[0].compute() == results[1].compute()  # every rank gets the same numbers
    assert {tuple(a.calls) for a in accelerators} == {("reduce", "pad_across_processes", "gather")}


def test_gather_single_process_is_a_copy_and_calls_nothing():
    class OneProcess:
        num_processes = 1

        def __getattr__(self, name):
            raise AssertionError(f"gather called accelerator.{name} with one process")

    logits, labels, _ = full_and_batches(seed=5)
    local = TokenMetrics().update(logits, labels)
    gathered = local.gather(OneProcess())
    assert gathered is not local and gathered.compute() == local.compute()
    gathered.update(logits, labels)
    assert local.num_tokens * 2 == gathered.num_tokens


# ---- temperature scaling -----------------------------------------------------------------------------------------


def synthetic_overconfident(n=2000, k=8, factor=3.0, seed=0):
    """Labels drawn from softmax(true logits): the true logits are calibrated; ``factor`` x them are not."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, k, generator=g, dtype=torch.float64) * 1.5
    labels = torch.multinomial(true.softmax(-1), 1, generator=g).squeeze(-1)
    return true * factor, labels


def grid_minimum(logits, labels, low, high, step):
    grid = [low + i * step for i in range(int(round((high - low) / step)) + 1)]
    values = [oracle_nll(logits, labels, t) for t in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    return grid[best], values[best]


def test_temperature_scaling_fixes_an_overconfident_model():
    logits, labels = synthetic_overconfident()
    result = fit_temperature(logits, labels)
    assert isinstance(result, TemperatureResult) and not result.at_bound
    coarse, _ = grid_minimum(logits, labels, 0.5, 8.0, 0.05)
    t_grid, nll_grid = grid_minimum(logits, labels, coarse - 0.05, coarse + 0.05, 0.0005)
    assert result.temperature == pytest.approx(t_grid, abs=0.0005)
    assert result.nll_after <= nll_grid + 1e-12  # no grid point does better
    assert result.nll_after == pytest.approx(oracle_nll(logits, labels, result.temperature), rel=1e-12)
    assert result.temperature == pytest.approx(3.0, rel=0.1)  # the factor that made the model over-confident
    assert result.nll_after < result.nll_before - 0.1
    assert result.ece_after < result.ece_before / 3
    assert result.nll_before == pytest.approx(oracle_nll(logits, labels, 1.0), rel=1e-12)
    assert result.metrics_after["num_tokens"] == result.num_tokens == 2000
    assert result.passes <= 15


def test_temperature_scaling_under_confident_float32_and_batches():
    logits, labels = synthetic_overconfident(n=1200, k=6, factor=0.4, seed=1)
    logits = logits.float().reshape(40, 30, 6)
    labels = labels.reshape(40, 30).clone()
    labels[:, :3] = -100
    logits[:, :3] = math.nan
    result = fit_temperature(logits, labels)
    assert result.temperature == pytest.approx(0.4, rel=0.15) and result.temperature < 1
    coarse, _ = grid_minimum(logits, labels, 0.1, 2.0, 0.01)
    t_grid, nll_grid = grid_minimum(logits, labels, coarse - 0.01, coarse + 0.01, 0.0001)
    assert result.temperature == pytest.approx(t_grid, abs=0.0002)
    assert result.nll_after <= nll_grid + 1e-6

    def batches():  # re-iterable source, as when the model is re-run for every pass
        for start in range(0, 40, 7):
            yield logits[start:start + 7], labels[start:start + 7]

    streamed = fit_temperature_from_batches(batches)
    assert streamed.temperature == pytest.approx(result.temperature, rel=1e-5)
    assert streamed.num_tokens == result.num_tokens == 40 * 27


def test_temperature_at_the_bounds_and_errors():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(200, 5, generator=g, dtype=torch.float64)
    always_right = fit_temperature(logits, logits.argmax(-1))
    assert always_right.at_bound and always_right.temperature == pytest.approx(0.01)
    assert always_right.nll_after < always_right.nll_before
    always_wrong = fit_temperature(logits, logits.argmin(-1), temperature_bounds=(0.1, 50.0))
    assert always_wrong.at_bound and always_wrong.temperature == pytest.approx(50.0)
    with pytest.raises(ValueError, match="No scored token"):
        fit_temperature(logits, torch.full((200,), -100))
    with pytest.raises(TypeError, match="one-shot"):
        fit_temperature_from_batches(iter([(logits, logits.argmax(-1))]))
    with pytest.raises(ValueError, match="not finite"):
        fit_temperature(logits.masked_fill(logits > 2.0, math.nan), logits.argmax(-1))
    with pytest.raises(ValueError, match="temperature_bounds"):
        fit_temperature(logits, logits.argmax(-1), temperature_bounds=(2.0, 1.0))


def test_sliced_logits_causal_shift():
    # logits[:, :-1] is a view that cannot be flattened without a copy: rows are read through their coordinates.
    logits, labels = random_batch((3, 12), 7, seed=13, ignore_share=0.0)
    labels[:, -3:] = -100
    view = logits[:, :-1]
    assert not view.is_contiguous()
    shifted = TokenMetrics(chunk_size=4).update(view, labels[:, 1:]).compute()
    copied = TokenMetrics(chunk_size=4).update(view.contiguous(), labels[:, 1:]).compute()
    assert_close(shifted, copied, rel=1e-12)
    fit_view = fit_temperature(view, labels[:, 1:], chunk_size=4)
    fit_copy = fit_temperature(view.contiguous(), labels[:, 1:], chunk_size=4)
    assert fit_view.temperature == pytest.approx(fit_copy.temperature, rel=1e-12)
