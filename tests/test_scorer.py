"""The fast scorer against naive full-sequence scoring, on tiny models of every family."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import FAMILIES, tiny_lm, tiny_task

from actsparse import accelerate, sparsify
from actsparse.evaluate import DenseReference, evaluate_task
from actsparse.evaluate import packed as packed_path
from actsparse.evaluate.cached import plan_chunks
from actsparse.evaluate.encode import Encoder, Group
from actsparse.evaluate.generate import greedy_generate
from actsparse.evaluate.groups import scored_positions
from actsparse.evaluate.metrics import choice_metrics, cut_at_stop, exact_match, gold_probability, topk_kl
from actsparse.evaluate.packed import packing_depth
from actsparse.evaluate.packing import make_tree, pack, plan_rows
from actsparse.evaluate.scorer import score_groups
from actsparse.sparsity.spec import SparsitySpec
from actsparse.tasks import Completion, Generation, MultipleChoice, task_from_requests


@torch.no_grad()
def naive_ll(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Log-likelihood of `continuation` after `context`: one unpadded full-sequence forward."""
    ids = torch.tensor([context + continuation])
    logp = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().log_softmax(-1)
    pred = logp[len(context) - 1 : -1]
    target = torch.tensor(continuation)
    return float(pred.gather(-1, target[:, None]).sum()), bool((pred.argmax(-1) == target).all())


def groups_of(tokenizer, task) -> list[Group]:
    encoder = Encoder(tokenizer)
    return [g for d in range(len(task)) for g in encoder.groups(task.request(d).pairs())]


def check_against_naive(model, groups: list[Group], pad: int) -> None:
    scores = score_groups(model, groups, pad)
    for group, score in zip(groups, scores, strict=True):
        for cont, ll, greedy in zip(group.continuations, score.lls, score.greedy, strict=True):
            want, want_greedy = naive_ll(model, group.context, cont)
            assert ll == pytest.approx(want, abs=2e-4, rel=1e-4)
            assert greedy == want_greedy


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cache_reuse_equals_naive_scoring(family):
    model, tokenizer = tiny_lm(family)
    groups = groups_of(tokenizer, tiny_task(n_docs=5, seed=1))
    # long contexts cross gemma's sliding window (16) so its ring cache is exercised
    groups.append(Group(tokenizer.encode("Question: " + "the red sun is hot " * 3 + "?\nAnswer:"), [[5, 6], [7]]))
    check_against_naive(model, groups, Encoder(tokenizer).pad)


def test_small_chunks_and_single_continuations_equal_naive_scoring():
    model, tokenizer = tiny_lm("qwen2")
    groups = groups_of(tokenizer, tiny_task(n_docs=6, seed=6))
    groups += [Group(tokenizer.encode("the cat"), [tokenizer.encode(" sat on")]), Group([5], [[7], [7, 8], []])]
    scores = score_groups(model, groups, 0, chunk_tokens=8)
    for group, score in zip(groups, scores, strict=True):
        for cont, ll, greedy in zip(group.continuations, score.lls, score.greedy, strict=True):
            want = naive_ll(model, group.context, cont) if cont else (0.0, True)
            assert (ll, greedy) == (pytest.approx(want[0], abs=2e-4, rel=1e-4), want[1])


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gemma3_text", "phi3"])
def test_cache_reuse_equals_naive_scoring_when_sparse(family):
    model, tokenizer = tiny_lm(family)
    groups = groups_of(tokenizer, tiny_task(n_docs=4, seed=2))
    with sparsify(model, SparsitySpec("intermediate", "top_p", 0.7)):
        check_against_naive(model, groups, Encoder(tokenizer).pad)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 60), max_size=30), st.integers(1, 400), st.integers(1, 8))
def test_plan_chunks_covers_the_rows_within_budget_and_row_limit(widths, budget, max_rows):
    widths = sorted(widths, reverse=True)
    chunks = plan_chunks(widths, budget, max_rows=max_rows)
    assert [i for a, b in chunks for i in range(a, b)] == list(range(len(widths)))
    for a, b in chunks:
        assert b - a == 1 or ((b - a) * widths[a] <= budget and b - a <= max_rows)


def test_padding_invariance():
    model, tokenizer = tiny_lm("llama")
    task = tiny_task(n_docs=9, seed=3)
    one, _ = evaluate_task(model, tokenizer, task, batch_size=1)
    many, _ = evaluate_task(model, tokenizer, task, batch_size=9)
    for a, b in zip(one.docs, many.docs, strict=True):
        assert a.score == b.score and a.metrics == pytest.approx(b.metrics, abs=1e-5)
    groups = groups_of(tokenizer, task)
    pad = Encoder(tokenizer).pad
    alone = [ll for g in groups for s in score_groups(model, [g], pad) for ll in s.lls]
    together = [ll for s in score_groups(model, groups, pad) for ll in s.lls]
    assert alone == pytest.approx(together, abs=1e-4)


def test_metrics_follow_the_log_likelihoods():
    model, tokenizer = tiny_lm("llama")
    task = tiny_task(n_docs=6, seed=4)
    result, _ = evaluate_task(model, tokenizer, task)
    for doc, group in zip(result.docs, groups_of(tokenizer, task), strict=True):
        request = task.request(doc.doc_id)
        lls = [naive_ll(model, group.context, c)[0] for c in group.continuations]
        pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
        norm = [ll / len(c) for ll, c in zip(lls, request.choices, strict=True)]
        pred_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
        expected = {"acc": float(pred == request.gold), "acc_norm": float(pred_norm == request.gold)}
        assert {k: doc.metrics[k] for k in expected} == expected
        assert doc.metrics["p_gold"] == pytest.approx(gold_probability(lls, request.choices, request.gold), abs=1e-5)
        assert doc.answer == str(pred) and doc.score == doc.metrics["acc"]


def test_separate_contexts_per_choice_are_scored_like_winogrande():
    model, tokenizer = tiny_lm("llama")
    contexts = ("the cat sat on the", "the dog sat on the")
    task = task_from_requests("wino", [MultipleChoice(contexts, (" mat",), 1, contexts)])
    result, _ = evaluate_task(model, tokenizer, task)
    encoder = Encoder(tokenizer)
    lls = [naive_ll(model, *encoder.pair(c, " mat"))[0] for c in contexts]
    assert result.docs[0].metrics["acc"] == float(lls[1] > lls[0])


@pytest.mark.parametrize("kind", ["multiple_choice", "lambada", "generate"])
def test_kl_is_zero_dense_and_positive_sparse(kind, tmp_path):
    model, tokenizer = tiny_lm("llama")
    task = tiny_task(n_docs=6, kind=kind, seed=5)
    dense, reference = evaluate_task(model, tokenizer, task, batch_size=4)
    assert all(d.kl is None and d.tokens > 0 for d in dense.docs)
    reference.save(tmp_path / "ref.pt")
    reference = DenseReference.load(tmp_path / "ref.pt")
    again, _ = evaluate_task(model, tokenizer, task, reference=reference, batch_size=3)
    assert all(abs(d.kl) < 1e-6 for d in again.docs)
    assert [d.answer for d in again.docs] == [d.answer for d in dense.docs]
    with sparsify(model, SparsitySpec("intermediate", "top_p", 0.5)) as stats:
        sparse, _ = evaluate_task(model, tokenizer, task, reference=reference)
    assert all(d.kl > 1e-4 for d in sparse.docs)
    with sparsify(model, SparsitySpec("intermediate", "top_p", 0.5)) as alone:  # one document a batch: no padding
        evaluate_task(model, tokenizer, task, reference=reference, batch_size=1)
    assert seen(stats) == seen(alone)  # padding is never counted, whatever the batch
    assert stats.overall() == pytest.approx(alone.overall(), abs=1e-3)
    assert {key[2] for key in stats.counts()} == ({"prefill", "decode"} if kind == "generate" else {"prefill"})


def seen(stats) -> dict:
    """Entries seen per (layer, vector, phase, expert): what padding, if counted, would change."""
    return {key: counts[2] for key, counts in stats.counts().items()}


def test_cached_path_counts_the_tokens_the_packed_path_counts_all_as_prefill():
    """Continuation chunks of one token over the cache are prefill of scored text, not decode; and the
    left padding of the contexts is not counted: both paths see exactly the same tokens."""
    model, _ = tiny_lm("llama")
    one_token_chunks = [Group([5, 6, 7], [[8, 9], [10, 11]]), Group([5], [[7, 9], [8, 12]])]
    padded_chunks = [*one_token_chunks, Group([5], [[7, 9, 4, 2], [8, 12, 13]]), Group([3, 4, 5, 6, 7], [[9]])]
    for groups in (one_token_chunks, padded_chunks):
        counted = {}
        for packing in (True, False):
            with sparsify(model, SparsitySpec("all_inputs", "top_p", 0.7)) as stats:
                score_groups(model, groups, 0, packing=packing)
            counted[packing] = stats
        assert {key[2] for key in counted[False].counts()} == {"prefill"}
        assert seen(counted[True]) == seen(counted[False])


def test_generation_equals_stepwise_greedy_without_cache():
    model, tokenizer = tiny_lm("llama", seed=1)
    prompts = [tokenizer.encode(p) for p in ["Question: the cat?\nAnswer:", "Hi", "the big red sun is"]]
    got = greedy_generate(model, tokenizer, prompts, until=(), max_tokens=5, pad=0)
    for prompt, tokens in zip(prompts, got, strict=True):
        ids = list(prompt)
        for _ in range(len(tokens)):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert tokens == ids[len(prompt) :]
        assert len(tokens) == 5 or tokens[-1] == 1


def test_generation_stops_at_stop_strings():
    model, tokenizer = tiny_lm("llama", seed=1)
    free = greedy_generate(model, tokenizer, [tokenizer.encode("Hi")], until=(), max_tokens=8, pad=0)[0]
    stop = tokenizer.decode(free[2:3])
    cut = greedy_generate(model, tokenizer, [tokenizer.encode("Hi")], until=(stop,), max_tokens=8, pad=0)[0]
    assert stop in tokenizer.decode(cut) and len(cut) <= 3 and cut == free[: len(cut)]


def test_exact_match_on_generated_text():
    model, tokenizer = tiny_lm("llama", seed=1)
    free = greedy_generate(model, tokenizer, [tokenizer.encode("Hi")], until=(), max_tokens=4, pad=0)[0]
    text = tokenizer.decode(free).strip()
    assert text
    requests = [
        Generation("Hi", (text.upper() + "!",), until=(), max_tokens=4),  # case and punctuation ignored
        Generation("Hi", ("nope", text + "x"), until=(), max_tokens=4),
    ]
    result, _ = evaluate_task(model, tokenizer, task_from_requests("gen", requests))
    assert [d.score for d in result.docs] == [1.0, 0.0]
    assert result.docs[0].answer == text


def test_reference_of_another_task_is_refused():
    model, tokenizer = tiny_lm("llama")
    _, reference = evaluate_task(model, tokenizer, tiny_task("a", n_docs=2))
    with pytest.raises(ValueError, match="reference is for task 'a'"):
        evaluate_task(model, tokenizer, tiny_task("b", n_docs=2), reference=reference)
    with pytest.raises(ValueError, match="document ids"):
        evaluate_task(model, tokenizer, tiny_task("a", n_docs=2), [5])


def test_progress_counts_every_document():
    model, tokenizer = tiny_lm("llama")
    seen: list[int] = []
    evaluate_task(model, tokenizer, tiny_task(n_docs=7), batch_size=3, progress=seen.append)
    assert sum(seen) == 7 and max(seen) <= 3  # batches of at most batch_size documents, cut by padding


def test_lambada_accuracy_is_one_exactly_when_every_target_token_is_greedy():
    model, tokenizer = tiny_lm("llama", seed=2)
    context = "the big red sun is"
    greedy = greedy_generate(model, tokenizer, [tokenizer.encode(context)], until=(), max_tokens=3, pad=0)[0]
    target = tokenizer.decode(greedy)
    wrong = tokenizer.decode([*greedy[:2], 3 if greedy[2] != 3 else 4])
    task = task_from_requests("lamb", [Completion(context, target), Completion(context, wrong)])
    result, _ = evaluate_task(model, tokenizer, task)
    assert [d.score for d in result.docs] == [1.0, 0.0]
    assert result.docs[0].answer == target


@given(st.integers(0, 10_000), st.integers(1, 12))
@settings(max_examples=30, deadline=None)
def test_topk_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise(seed, k):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(3, 12, generator=g) * 3).log_softmax(-1)
    logq = (torch.randn(3, 12, generator=g) * 3).log_softmax(-1)
    exact = (logp.double().exp() * (logp.double() - logq.double())).sum(-1)
    tol = 1e-5 * (1 + exact)  # float32 log-probs: tails from 1 - sum(p) are this precise
    values, ids = logp.topk(k, dim=-1)
    approx = topk_kl(values, logq.gather(-1, ids))
    assert torch.all(approx <= exact + tol) and torch.all(approx >= 0)
    if k == 12:
        assert torch.all((approx - exact).abs() <= tol)
    assert torch.allclose(topk_kl(values, values), torch.zeros(3, dtype=torch.float64))


def test_generation_metrics_as_lm_eval():
    assert cut_at_stop(" Paris, France.\nNext", ("\n", ".", ",")) == "Paris"
    assert cut_at_stop("  The Beatles\n", ("\n",)) == "The Beatles"
    assert exact_match("the beatles!", ("The Beatles",)) == 1.0
    assert exact_match("Beatles", ("The Beatles", "Fab Four")) == 0.0
    assert choice_metrics([-4.0, -6.0], ["ab", "abcdef"], 1)[0] == {"acc": 0.0, "acc_norm": 1.0}


# --- tree packing: packed and cached paths agree, on every kind of model the packed path accepts ---


class MaskKinds:
    """Counts the model's forwards by the rank of their attention mask (4: packed trees, 2: cached path)."""

    def __init__(self, model) -> None:
        self.seen: list[int] = []
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs) -> None:
        self.seen.append(kwargs["attention_mask"].dim())


def varied_groups(tokenizer) -> list[Group]:
    """Shared choice prefixes, single-token and empty choices, lengths from 1 token to one long tree."""
    long = Group(tokenizer.encode("the big red sun is hot and the sky is " * 2), [tokenizer.encode(" big and red")] * 2)
    return [
        *groups_of(tokenizer, tiny_task(n_docs=6, seed=7)),
        Group([5], [[7], [8], [9]]),  # one-token context and one-token choices: no branches at all
        Group([5, 6], [[7, 9, 10], [7, 9, 11, 12], [7, 9]]),  # two tokens shared, one choice ends there
        Group([5], [[7], [7, 8], []]),  # an empty choice: nothing shared
        long,  # the deepest tree, wider than a forward's budget below
    ]


def assert_same_scores(packed, cached, tol: float = 1e-5) -> None:
    for a, b in zip(packed, cached, strict=True):
        assert a.lls == pytest.approx(b.lls, abs=tol, rel=tol)
        assert (a.greedy, a.argmax) == (b.greedy, b.argmax)
        assert torch.equal(a.ids, b.ids)
        assert torch.allclose(a.logp, b.logp, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "family, attention",
    [(f, "eager") for f in ("llama", "qwen2", "gemma2", "gemma3_text", "phi3", "olmo2", "qwen3_moe")]
    + [(f, "sdpa") for f in ("llama", "gemma3_text", "qwen3_moe")],
)
def test_packed_trees_equal_the_cached_path(family, attention, monkeypatch):
    model, tokenizer = tiny_lm(family)
    model.set_attn_implementation(attention)
    groups = varied_groups(tokenizer)
    if family == "gemma3_text":  # a window of 16 sends most of these trees to the cached path (next test)
        model.config.sliding_window = 128
    kinds = MaskKinds(model)
    cached = score_groups(model, groups, 0, packing=False)
    assert set(kinds.seen) == {2}
    kinds.seen.clear()
    monkeypatch.setattr(packed_path, "FORWARD_TOKENS", 48)  # several forwards, the long tree alone beyond the budget
    monkeypatch.setattr(packed_path, "LOGITS", 24 * 97)  # 24 scored positions of the tiny vocabulary
    packed = score_groups(model, groups, 0)
    assert set(kinds.seen) == {4} and len(kinds.seen) > 2
    assert_same_scores(packed, cached)
    # the dense top-k ids of one path read back by the other: the reads a sparse run makes for KL
    reread = score_groups(model, groups, 0, reference=[s.ids for s in cached])
    assert all(torch.allclose(a.logp, b.logp, atol=1e-5) for a, b in zip(reread, cached, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_packed_trees_equal_the_cached_path_on_cuda(family):
    model, tokenizer = tiny_lm(family)
    model = model.to("cuda")
    if family == "gemma3_text":
        model.config.sliding_window = 128
    groups = varied_groups(tokenizer)
    packed, cached = score_groups(model, groups, 0), score_groups(model, groups, 0, packing=False)
    assert_same_scores(packed, cached, tol=1e-4)  # float32; GPU kernels reorder sums


def test_trees_beyond_the_sliding_window_take_the_cached_path():
    model, tokenizer = tiny_lm("gemma3_text")  # sliding window 16 on every layer
    assert packing_depth(model) == 16
    groups = varied_groups(tokenizer)  # the last tree is 40 tokens deep, the others within 16
    kinds = MaskKinds(model)
    packed = score_groups(model, groups, 0)
    assert set(kinds.seen) == {2, 4}
    assert_same_scores(packed, score_groups(model, groups, 0, packing=False))
    model.config._attn_implementation = "flash_attention_2"  # no custom masks there: nothing is packed
    assert packing_depth(model) == 0


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_packed_trees_count_real_tokens_only_when_sparse(family):
    model, tokenizer = tiny_lm(family)
    groups = varied_groups(tokenizer)
    counts = {}
    for packing in (True, False):
        with sparsify(model, SparsitySpec("all_inputs", "top_p", 0.7)) as stats:
            scores = score_groups(model, groups, 0, packing=packing)
        pooled: dict = {}
        for (layer, vector, _phase, expert), row in stats.counts().items():  # decode or prefill: as it comes
            before = pooled.get((layer, vector, expert), (0, 0, 0))
            pooled[layer, vector, expert] = [a + b for a, b in zip(before, row, strict=True)]
        counts[packing] = (scores, pooled)
    (packed, ours), (cached, theirs) = counts[True], counts[False]
    assert_same_scores(packed, cached, tol=1e-4)
    assert ours.keys() == theirs.keys()
    for key, (zeroed, natural, seen) in ours.items():
        assert seen == theirs[key][2]  # every real token once, padding never
        assert abs(zeroed - theirs[key][0]) <= 1e-3 * seen and natural == theirs[key][1]
    real = sum(len(g.context) - 1 + scored_positions(g) for g in groups)  # trunks and branches
    routed = getattr(model.config, "num_experts_per_tok", 1)  # an MoE layer counts each token in its experts
    seen = sum(row[2] for (layer, vector, _), row in ours.items() if (layer, vector) == (0, "input"))
    assert seen == real * routed * model.config.hidden_size


def test_evaluate_task_packed_equals_cached_with_reference_and_accelerate(tmp_path):
    model, tokenizer = tiny_lm("llama")
    task = tiny_task(n_docs=10, seed=8)
    packed, reference = evaluate_task(model, tokenizer, task, batch_size=4)
    cached, cached_reference = evaluate_task(model, tokenizer, task, batch_size=4, packing=False)
    assert [d.score for d in packed.docs] == [d.score for d in cached.docs]
    for a, b in zip(packed.docs, cached.docs, strict=True):
        assert a.metrics == pytest.approx(b.metrics, abs=1e-5)  # p_gold: from log-likelihoods equal to ~1e-6
    for doc in reference.topk:
        assert torch.equal(reference.topk[doc][0], cached_reference.topk[doc][0])
        assert torch.allclose(reference.topk[doc][1], cached_reference.topk[doc][1], atol=1e-5)
    spec = SparsitySpec("intermediate", "top_p", 0.6)
    runs = []
    for packing in (True, False):
        for context in (sparsify, accelerate):
            with context(model, spec) as stats:
                result, _ = evaluate_task(model, tokenizer, task, reference=reference, batch_size=4, packing=packing)
            runs.append(([d.kl for d in result.docs], stats.tokens_seen(), stats.overall()))
    for kl, seen, sparsity in runs[1:]:
        assert kl == pytest.approx(runs[0][0], abs=1e-4, rel=1e-3)
        assert seen == runs[0][1] and sparsity == pytest.approx(runs[0][2], abs=1e-3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=4), min_size=1, max_size=4), st.integers(1, 5))
def test_tree_mask_lets_each_token_see_its_own_sequence(branch_lengths, trunk):
    """Brute force: a token sees exactly the earlier tokens of its own trunk + branch, in another tree nothing."""
    trees = [make_tree(range(trunk), [[0] * n for n in lengths if n]) for lengths in branch_lengths]
    width, rows = plan_rows([len(t) for t in trees])
    assert sorted(i for row in rows for i in row) == list(range(len(trees)))
    assert all(sum(len(trees[i]) for i in row) <= width for row in rows)
    batch = pack(trees, rows, 0, torch.float32, "cpu")
    sees = batch.attention_mask[:, 0] == 0
    owner = {}  # (row, column) → (tree, branch, position)
    for i, (r, at) in batch.where.items():
        for j, (b, p) in enumerate(zip(trees[i].branch, trees[i].positions, strict=True)):
            owner[r, at + j] = (i, b, p)
            assert batch.position_ids[r, at + j] == p and batch.real[r, at + j]
    for r in range(sees.shape[0]):
        for q in range(sees.shape[1]):
            for kv in range(sees.shape[2]):
                want = (r, q) in owner and (r, kv) in owner
                if want:
                    (tq, bq, pq), (tk, bk, pk) = owner[r, q], owner[r, kv]
                    want = tq == tk and bk in (0, bq) and pk <= pq
                assert bool(sees[r, q, kv]) == want
    assert int(batch.real.sum()) == len(owner)


def test_packed_scoring_without_boolean_logits_to_keep(monkeypatch) -> None:
    """Older transformers 5 releases project every position: the scorer then picks the scored ones itself."""
    model, tokenizer = tiny_lm()
    encoder = Encoder(tokenizer)
    groups = encoder.groups([("The cat sat on", " the mat"), ("The cat sat on", " a hat today")])
    expected = score_groups(model, groups, encoder.pad)
    monkeypatch.setattr(packed_path, "_masked_logits_to_keep", lambda: False)
    for a, b in zip(score_groups(model, groups, encoder.pad), expected, strict=True):
        assert a.lls == pytest.approx(b.lls, abs=1e-5) and a.greedy == b.greedy and torch.equal(a.ids, b.ids)
