"""Tensors that need not live on the GPU: the frozen input embedding (:class:`HostEmbedding`)
and, where the memory plan says so, checkpointed layers' inputs between the forward and the
backward pass (:class:`HostStash`, :func:`offloaded_checkpoint`)."""

from __future__ import annotations

from contextlib import contextmanager

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


# --- checkpointed layers' inputs in host memory ---------------------------------------------------


class HostStash:
    """Checkpointed layers' inputs parked in host memory during the forward pass and brought
    back, in reverse order, for the backward pass's recomputation.

    On a GPU both copies run on a side stream: the forward pass does not wait for the copy out
    (the input stays allocated until the copy has read it: ``record_stream``), and taking one
    input back starts the copy of the next one the backward pass will ask for (the previous
    layer's), so it travels while this layer recomputes and back-propagates. At most two
    layers' inputs are on the GPU at once (the one in use and the one on its way). The host
    buffers are pinned, from PyTorch's caching host allocator (reused from step to step).
    On the CPU (the tests) the "host copy" is a copy, and nothing is asynchronous.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.parked: dict[int, _Parked] = {}
        self.next_handle = 0  # also how many tensors were ever parked

    def __len__(self) -> int:
        return len(self.parked)

    def put(self, tensor: torch.Tensor) -> int:
        """Park a copy of ``tensor`` in host memory; returns the handle :meth:`take` wants."""
        parked = _Parked(shape=tensor.shape)
        if self.stream is None:
            parked.host = tensor.detach().clone()
        else:
            parked.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                parked.host.copy_(tensor.detach(), non_blocking=True)
            tensor.record_stream(self.stream)  # not reused before the copy has read it
        handle, self.next_handle = self.next_handle, self.next_handle + 1
        self.parked[handle] = parked
        return handle

    def take(self, handle: int) -> torch.Tensor:
        """The parked tensor, back on the device; the one parked before it starts its way."""
        parked = self.parked.pop(handle)
        if self.stream is None:
            return parked.host
        self._bring(parked)
        earlier = max((h for h in self.parked if h < handle), default=None)
        if earlier is not None:
            self._bring(self.parked[earlier])
        main = torch.cuda.current_stream(self.device)
        main.wait_event(parked.arrived)
        parked.device_copy.record_stream(main)
        return parked.device_copy

    def clear(self) -> None:
        """Forget everything parked (a forward pass that had no backward pass)."""
        self.parked.clear()

    def _bring(self, parked: _Parked) -> None:
        if parked.device_copy is not None:
            return
        # the side stream copied it out in order, so it reads the host buffer after that copy
        with torch.cuda.stream(self.stream):
            parked.device_copy = parked.host.to(self.device, non_blocking=True)
            parked.arrived = self.stream.record_event()


class _Parked:
    def __init__(self, shape: torch.Size) -> None:
        self.shape = shape
        self.host: torch.Tensor | None = None
        self.device_copy: torch.Tensor | None = None
        self.arrived: torch.cuda.Event | None = None


def offloaded_checkpoint(layer: torch.nn.Module, stash: HostStash, plain):
    """A ``_gradient_checkpointing_func`` for a transformers decoder layer whose input should
    wait in host memory: called as ``func(run, hidden_states)`` (``run`` is the layer's forward
    with its other arguments bound), it runs the layer without keeping anything, parks its input
    in ``stash``, and in the backward pass brings the input back, recomputes the layer and
    back-propagates through it (:class:`_OffloadedLayer`). The layer's trainable parameters
    are inputs of the node, so their gradients flow through autograd as usual. Called any other
    way (more positional inputs, or grad off), it is ``plain``, transformers' own checkpoint."""

    def checkpointed(run, *args):
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or not torch.is_grad_enabled():
            return plain(run, *args)
        trainable = [p for p in layer.parameters() if p.requires_grad]
        return _OffloadedLayer.apply(run, stash, args[0], *trainable)

    return checkpointed


class _OffloadedLayer(torch.autograd.Function):
    """Reentrant-style checkpoint of one layer, its input parked in host memory."""

    @staticmethod
    def forward(ctx, run, stash: HostStash, hidden, *trainable):
        ctx.run, ctx.stash, ctx.trainable = run, stash, trainable
        ctx.handle = stash.put(hidden)
        ctx.replay = ReplayState.capture(hidden.device)
        return _first(run(hidden))

    @staticmethod
    def backward(ctx, grad):
        hidden = ctx.stash.take(ctx.handle)
        with torch.enable_grad(), ctx.replay.restored():
            hidden = hidden.detach().requires_grad_(ctx.needs_input_grad[2])
            out = _first(ctx.run(hidden))
        wanted = ([hidden] if hidden.requires_grad else []) + list(ctx.trainable)
        grads = list(torch.autograd.grad(out, wanted, grad, allow_unused=True))
        grad_hidden = grads.pop(0) if hidden.requires_grad else None
        return (None, None, grad_hidden, *grads)


def _first(out):
    """Older transformers' decoder layers return (hidden_states, ...), newer ones the tensor."""
    return out[0] if isinstance(out, tuple) else out


class ReplayState:
    """What a recomputation in the backward pass must run under to repeat the forward pass
    exactly: its autocast settings (the backward pass runs on another thread, without them) and
    the random number generators' state (adapter dropout draws the same masks again)."""

    def __init__(self, device: torch.device, autocast: tuple[bool, torch.dtype],
                 cpu_rng: torch.Tensor, device_rng: torch.Tensor | None) -> None:
        self.device, self.autocast = device, autocast
        self.cpu_rng, self.device_rng = cpu_rng, device_rng

    @classmethod
    def capture(cls, device: torch.device) -> ReplayState:
        kind = device.type
        return cls(device, (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)),
                   torch.get_rng_state(),
                   torch.cuda.get_rng_state(device) if kind == "cuda" else None)

    @contextmanager
    def restored(self):
        enabled, dtype = self.autocast
        devices = [self.device] if self.device_rng is not None else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type), \
                torch.autocast(self.device.type, dtype=dtype, enabled=enabled):
            torch.set_rng_state(self.cpu_rng)
            if self.device_rng is not None:
                torch.cuda.set_rng_state(self.device_rng, self.device)
            yield
