"""The frozen input embedding kept in host memory gives the same rows, and never a tied one."""

from __future__ import annotations

import torch

from jobs.training.offload import HostEmbedding, embedding_to_host


class _TinyLM(torch.nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 50, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, module):
        self.embed = module

    def get_output_embeddings(self):
        return self.head


def test_host_embedding_looks_up_the_same_rows_and_holds_no_parameter():
    model = _TinyLM(tied=False)
    ids = torch.tensor([[3, 7, 49, 0]])
    expected = model.embed(ids)
    assert embedding_to_host(model, torch.device("cpu"))
    assert isinstance(model.embed, HostEmbedding)
    assert torch.equal(model.embed(ids), expected)
    assert list(model.embed.parameters()) == [] and model.embed.state_dict() == {}
    into = torch.zeros_like(expected)  # a CUDA graph's fixed input tensor
    model.embed.lookup_into(ids, into)
    assert torch.equal(into, expected)


def test_an_embedding_tied_to_the_head_stays_where_it_is():
    model = _TinyLM(tied=True)
    assert not embedding_to_host(model, torch.device("cpu"))
    assert isinstance(model.embed, torch.nn.Embedding)


def test_the_trainer_passes_the_batch_ids_kept_in_host_memory():
    from jobs.training.data import collate
    from jobs.training.tokenize import TokenizedExample

    batch = collate([TokenizedExample([5, 6, 7], [0, 1, 1]), TokenizedExample([8, 9], [0, 1])],
                    packing=True, pad_id=0)
    moved = batch.to(torch.device("cpu"))
    assert moved.host_input_ids is batch.input_ids  # what HostEmbedding is given
    assert moved.to(torch.device("cpu")).host_input_ids is batch.input_ids
    embedding = HostEmbedding(torch.nn.Embedding(12, 4), torch.device("cpu"))
    assert torch.equal(embedding(moved.host_input_ids),
                       torch.nn.functional.embedding(batch.input_ids, embedding.weight))


def test_token_losses_with_the_embedding_in_host_memory_equal_the_plain_model():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from jobs.training.data import collate
    from jobs.training.tokenize import TokenizedExample
    from jobs.training.trainer import token_losses

    torch.manual_seed(3)
    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                         tie_word_embeddings=False)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules="all-linear"))
    batch = collate([TokenizedExample([5, 6, 7, 9], [0, 1, 1, 1])], packing=False, pad_id=0)
    expected, _ = token_losses(model, batch.to(torch.device("cpu")))
    assert embedding_to_host(model.get_base_model(), torch.device("cpu"))
    moved = batch.to(torch.device("cpu"))
    assert moved.host_input_ids is not None
    losses, _ = token_losses(model, moved)
    assert torch.equal(losses, expected)
