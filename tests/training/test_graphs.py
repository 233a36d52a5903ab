"""CUDA-graphed passes: what can be checked without a GPU. No test here captures a graph.

A graph replays fixed shapes, so a graphed pass computes a packed row padded to its bucket, with
the loss over every row and the rows without loss ignored. These tests check that this padded,
fixed-shape pass gives the eager pass's loss, count and gradients exactly (fp64 on the CPU, through
the same attention function with the padding as an example of its own), and the rules that decide
when graphs are used. The GPU path, capture and replay, is checked by `benchmarks/gpu_checks.py
graphs` (`--only graphs`): graphed against eager training step by step on a CUDA GPU.
"""

from __future__ import annotations

import pytest
import torch

from jobs.training import graphs
from jobs.training.attention import register_varlen_attention
from jobs.training.config import TrainingConfig
from jobs.training.data import IGNORE_INDEX, collate, pad_packed
from jobs.training.kernels import chunked_linear_cross_entropy
from jobs.training.tokenize import TokenizedExample
from jobs.training.trainer import every_row_loss, forward_loss, load_model, train

EXAMPLES = [TokenizedExample([1, 520, 30, 44, 90, 2], [0, 0, 1, 1, 1, 1]),
            TokenizedExample([1, 77, 31, 12], [0, 1, 1, 1]),
            TokenizedExample([1, 9, 8, 7, 6, 5, 4], [0, 0, 0, 1, 1, 1, 1])]


def test_a_padded_row_is_its_examples_then_an_example_of_padding_without_loss():
    batch = collate(EXAMPLES[:2], packing=True, pad_id=0)
    padded = pad_packed(batch, 16, pad_id=0)
    assert padded.input_ids.shape == (1, 16)
    assert padded.input_ids[0, :10].tolist() == batch.input_ids[0].tolist()
    assert padded.input_ids[0, 10:].tolist() == [0] * 6
    assert padded.labels[0, 10:].tolist() == [IGNORE_INDEX] * 6
    assert padded.cu_seqlens.tolist() == [0, 6, 10, 16]
    assert padded.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5]
    assert (padded.max_length, padded.tokens, padded.target_tokens) == (16, 10, batch.target_tokens)
    exact = pad_packed(batch, 10, pad_id=0)  # already that long: an empty padding example
    assert exact.cu_seqlens.tolist() == [0, 6, 10, 10]
    with pytest.raises(ValueError):
        pad_packed(batch, 9, pad_id=0)
    with pytest.raises(ValueError):
        pad_packed(collate(EXAMPLES[:2], packing=False, pad_id=0), 16, pad_id=0)


@pytest.mark.parametrize("per_token", [False, True])
def test_ignored_rows_count_for_nothing_in_the_chunked_head(per_token):
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64)
    labels = torch.randint(0, 30, (11,))
    labels[[0, 4, 5, 10]] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    # every row with the ignored ones masked, in chunks that straddle them
    loss_all, correct_all = chunked_linear_cross_entropy(hidden, weight, labels, 3,
                                                         per_token=per_token, ignored=True)
    (loss_all.sum()).backward()
    grad_all = hidden.grad.clone()
    hidden.grad = None
    loss_kept, correct_kept = chunked_linear_cross_entropy(hidden[keep], weight, labels[keep], 3,
                                                           per_token=per_token)
    loss_kept.sum().backward()
    if per_token:
        assert torch.equal(loss_all[~keep], torch.zeros(4, dtype=torch.float64))
        torch.testing.assert_close(loss_all[keep], loss_kept)
    else:
        torch.testing.assert_close(loss_all, loss_kept)
    assert int(correct_all) == int(correct_kept)
    torch.testing.assert_close(grad_all, hidden.grad)
    assert torch.equal(grad_all[~keep], torch.zeros(4, 8, dtype=torch.float64))


def test_the_fixed_shape_pass_gives_the_eager_loss_and_gradients_without_capture_on_cpu(
        base_model_dir):
    """What a graph captures (padded row, every row, embeddings passed in) against the eager
    pass, on the trainer's model with every layer checkpointed."""
    config = TrainingConfig(base_model_dir=str(base_model_dir), train_file="x", output_dir="x",
                            device="cpu", lora_dropout=0.0, gradient_checkpointing=True)
    model = load_model(config, torch.device("cpu"), attention=register_varlen_attention())
    model.double()
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = collate(EXAMPLES, packing=True, pad_id=0)

    def run(loss_fn):
        for p in trainable:
            p.grad = None
        loss, correct = loss_fn()
        loss.backward()
        return loss.detach(), int(correct), [p.grad.clone() for p in trainable]

    eager = run(lambda: forward_loss(model, batch))
    padded = pad_packed(batch, graphs.bucket(batch.tokens), pad_id=0)
    embeds = model.get_base_model().get_input_embeddings()(padded.input_ids)
    graphed = run(lambda: every_row_loss(model, padded, embeds.detach()))
    assert padded.input_ids.shape[1] == graphs.BUCKET_TOKENS
    torch.testing.assert_close(graphed[0], eager[0])
    assert graphed[1] == eager[1]
    for a, b in zip(graphed[2], eager[2]):
        torch.testing.assert_close(a, b)


def test_buckets_and_keys_of_passes_without_capture():
    assert graphs.bucket(1) == graphs.bucket(256) == 256
    assert graphs.bucket(257) == 512
    assert graphs.key_of(600, 1) == (768, 3)  # one example, the padding one, and the end


def test_the_rule_wants_graphs_where_possible_and_small_enough_without_capture():
    cuda = torch.device("cuda")
    usable = dict(device=cuda, distributed=False, packing=True, varlen=True,
                  objective="supervised", dropout=0.0)
    assert graphs.unavailable_reason(**usable) is None
    for change in ({"device": torch.device("cpu")}, {"distributed": True}, {"packing": False},
                   {"varlen": False}, {"objective": "dpo"}, {"dropout": 0.05}):
        assert graphs.unavailable_reason(**{**usable, **change})
    enough = graphs.MIN_PASSES_PER_GRAPH
    small = [graphs.key_of(600, 1)] * enough + [graphs.key_of(1000, 1)] * enough
    assert graphs.wanted(None, None, small)
    assert not graphs.wanted(None, None, small[1:])  # a graph replayed too few times to pay
    long = [graphs.key_of(graphs.MAX_TOKENS + 1, 8)] * 100  # long passes keep the GPU busy
    assert not graphs.wanted(None, None, long)
    assert graphs.wanted(True, None, long) and graphs.wanted(True, None, small[:1])
    assert not graphs.wanted(False, None, small)
    assert not graphs.wanted(True, "no CUDA", small)
    assert not graphs.wanted(True, None, [])


def test_asking_for_graphs_on_the_cpu_warns_and_trains_without_capture(make_config, reporter):
    result = train(make_config(cuda_graphs=True, max_steps=1), reporter)
    assert result.status == "succeeded"
    warnings = [e for e in reporter.events if e["level"] == "warning"
                and "cuda_graphs" in e["message"]]
    assert warnings and "CUDA" in warnings[0]["message"]
    assert not any("CUDA graphs:" in e["message"] for e in reporter.events)


def test_the_option_is_validated_and_documented():
    from jobs.training.config import TrainingConfig as Config

    assert "CUDA graph" in Config.__dataclass_fields__["cuda_graphs"].metadata["help"]
    assert Config(base_model_dir="x", train_file="x", output_dir="x").cuda_graphs is None
