"""Frozen tensors that need not live on the GPU."""

from __future__ import annotations

import torch


class HostEmbedding(torch.nn.Module):
    """A frozen input embedding table kept in host memory; only the rows of a batch's tokens
    travel to the GPU (a few MB a step, against 1 GB for a 128k x 4096 bf16 table)."""

    def __init__(self, embedding: torch.nn.Embedding, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        # A plain attribute, not a parameter or buffer, so that nothing moves it back to the GPU
        # and no state dict carries it.
        self.weight = embedding.weight.detach().to("cpu")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``input_ids``, on the model's device. Ids already in host memory (the
        trainer passes the batch's own, :attr:`jobs.training.data.Batch.host_input_ids`) cost
        the GPU no wait: the rows are gathered into pinned memory and copied asynchronously.
        Ids on the GPU are first copied back, which waits for the GPU's queued work."""
        rows = self._gathered(input_ids)
        return rows.to(self.device, non_blocking=rows.is_pinned())

    def lookup_into(self, input_ids: torch.Tensor, out: torch.Tensor) -> None:
        """:meth:`forward` into ``out`` (a tensor of the right shape on the device), with no
        device memory of its own: what a CUDA graph's fixed input tensor needs."""
        rows = self._gathered(input_ids)
        out.copy_(rows, non_blocking=rows.is_pinned())

    def _gathered(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu").reshape(-1)
        rows = torch.empty((ids.numel(), self.embedding_dim), dtype=self.weight.dtype,
                           pin_memory=self.device.type == "cuda")
        torch.index_select(self.weight, 0, ids, out=rows)
        return rows.view(*input_ids.shape, self.embedding_dim)


def embedding_to_host(model, device: torch.device) -> bool:
    """Swap a frozen, untied input embedding for a :class:`HostEmbedding`; False if it is tied to
    the output head (the head needs the same matrix on the GPU) or not a plain embedding."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, torch.nn.Embedding) or (
            head is not None and head.weight is embedding.weight):
        return False
    model.set_input_embeddings(HostEmbedding(embedding, device))
    return True
