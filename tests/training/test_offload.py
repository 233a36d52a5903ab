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


def test_an_embedding_tied_to_the_head_stays_where_it_is():
    model = _TinyLM(tied=True)
    assert not embedding_to_host(model, torch.device("cpu"))
    assert isinstance(model.embed, torch.nn.Embedding)
